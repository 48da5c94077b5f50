"""The problem every mechanism of chapter 06 solves: scikit-learn's digits, and small numpy networks.

    X_train, y_train, X_test, y_test = load_digits_split()     # 1437 + 360 images of 8x8, 10 classes
    model = get_model("mlp")                                   # 64-128-10, ReLU, softmax
    params = model.init(seed=0)                                # {'W1': (64, 128), 'b1': ..., 'W2': ..., 'b2': ...}
    activations = model.forward(params, X)                     # [X, hidden, logits]
    for layer, grads in model.backward(params, activations, y):   # layer 1 ({'W2', 'b2'}) first, then layer 0
        ...

Data: every rank loads the bundled digits itself (0.9 MB shipped inside scikit-learn: no download,
no message) and makes the same seeded split and scaling, so rank r can read any row a global batch
gives it. (scatter_rows would leave each rank one fixed block: a fresh shuffle of the whole set
every epoch would then have to move rows between ranks, and the batches would depend on the number
of ranks, so no single-process run could be the reference.)

Batches: one seeded shuffle of the training set per epoch, the same on every rank (chapter 04's
sampler, set_epoch), cut into global batches of batch_size (the last, shorter one is dropped, as
PyTorch's drop_last does: every batch then has at least one example per rank). Global batch b is
split over the p ranks in blocks (block_range): rank r takes len(block_range(B, p, r)) examples,
so shards differ by one when p does not divide B.

Models: a fully connected network with ReLU hidden layers and a softmax output, float64, mean
cross-entropy loss. Parameters are a dict of named arrays (W1, b1, W2, b2, ...), the same for the
same seed on every rank. The backward pass is a generator that yields each layer's gradient as soon
as it is computed, last layer first, and computes the earlier layers only when asked for the next:
bucketing starts reducing a layer's gradient while the layers before it are still to be done.
Cost of forward + backward on n examples: about 6 n sum(in * out) flops.
"""
import contextlib
import functools
import os
from pathlib import Path

import numpy as np

from ..data import DistributedSampler, block_range

__all__ = ["load_digits_split", "MLP", "MODELS", "get_model", "epoch_sampler", "global_batches", "shard_of",
           "SPLIT_SEED"]

SPLIT_SEED = 0  # the train/test split is fixed: every run, every seed, every rank sees the same one
TEST_FRACTION = 0.2


@functools.cache
def load_digits_split():
    """(X_train, y_train, X_test, y_test): scikit-learn's digits, split 80/20 (stratified, seeded) and
    standardized with the training set's mean and standard deviation (once). float64 X, int64 y.

    The split is made with scikit-learn once per machine and kept in a .npz file (split_cache_file):
    importing scikit-learn takes about a second in every process, which every rank of every run paid."""
    cache = split_cache_file()
    try:
        with np.load(cache) as saved:
            arrays = tuple(saved[name] for name in ("X_train", "y_train", "X_test", "y_test"))
    except (OSError, KeyError, ValueError):
        arrays = _split_with_sklearn()
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs the second
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(f"{cache.name}.{os.getpid()}.npz")  # ranks may write at once
            np.savez(partial, **dict(zip(("X_train", "y_train", "X_test", "y_test"), arrays)))
            os.replace(partial, cache)
    for array in arrays:
        array.flags.writeable = False  # shared by every run in this process
    return arrays


def split_cache_file():
    """Where the split is kept: named by scikit-learn's version and the split's settings, so another
    version (whose split could differ) makes its own. SYNCML_CACHE, else ~/.cache/syncml."""
    from importlib.metadata import version

    folder = Path(os.environ.get("SYNCML_CACHE") or Path.home() / ".cache" / "syncml")
    return folder / f"digits-sklearn{version('scikit-learn')}-seed{SPLIT_SEED}-test{TEST_FRACTION}.npz"


def _split_with_sklearn():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X.astype(np.float64), y.astype(np.int64), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    mean, std = X_train.mean(axis=0), X_train.std(axis=0)
    std[std == 0] = 1.0  # the corner pixels are always 0
    return (X_train - mean) / std, y_train, (X_test - mean) / std, y_test


# ----------------------------------------------------------------------------- the models

class MLP:
    """x -> ReLU(x W1 + b1) -> ... -> logits = h W_L + b_L -> softmax; loss = mean cross-entropy.

    sizes (64, 10) is softmax regression (no hidden layer); (64, 128, 10) an MLP with one hidden
    layer. Layer l (from 0) holds W{l+1} of shape (sizes[l], sizes[l+1]) and b{l+1}.
    """

    def __init__(self, sizes, name=None):
        self.sizes = tuple(int(s) for s in sizes)
        self.name = name or "mlp " + "-".join(map(str, self.sizes))
        self.layers = [(f"W{l + 1}", f"b{l + 1}") for l in range(len(self.sizes) - 1)]  # forward order

    def init(self, seed):
        """He-initialized weights (normal, std sqrt(2 / fan_in)) and zero biases, from `seed` only."""
        rng = np.random.default_rng(seed)
        params = {}
        for (w, b), fan_in, fan_out in zip(self.layers, self.sizes, self.sizes[1:]):
            params[w] = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
            params[b] = np.zeros(fan_out)
        return params

    def forward(self, params, X):
        """The activations [X, h1, ..., logits]: what backward needs."""
        activations = [X]
        for l, (w, b) in enumerate(self.layers):
            z = activations[-1] @ params[w] + params[b]
            activations.append(z if l == len(self.layers) - 1 else np.maximum(z, 0.0))
        return activations

    def loss(self, activations, y):
        """Mean cross-entropy of the logits (the last activation) against the labels y."""
        logits = activations[-1]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return float(-log_probs[np.arange(len(y)), y].mean())

    def backward(self, params, activations, y):
        """Yield (layer, {W: dW, b: db}) of the mean loss, last layer first.

        delta = dloss/dlogits = (softmax(logits) - onehot(y)) / n; for layer l: dW = a_l^T delta,
        db = sum of delta over the rows; then delta = (delta W^T) * (a_l > 0) for the layer below,
        computed only after the caller has taken this layer's gradient."""
        logits = activations[-1]
        delta = np.exp(logits - logits.max(axis=1, keepdims=True))
        delta /= delta.sum(axis=1, keepdims=True)
        delta[np.arange(len(y)), y] -= 1.0
        delta /= len(y)
        for l in reversed(range(len(self.layers))):
            w, b = self.layers[l]
            yield l, {w: activations[l].T @ delta, b: delta.sum(axis=0)}
            if l:
                delta = (delta @ params[w].T) * (activations[l] > 0)

    def predict(self, params, X):
        return np.argmax(self.forward(params, X)[-1], axis=1)

    def accuracy(self, params, X, y):
        return float(np.mean(self.predict(params, X) == y))


MODELS = {"softmax": (64, 10), "mlp": (64, 128, 10)}


def get_model(model):
    """A model by name ("softmax", "mlp"), or `model` itself if it is a model object (an MLP, or
    anything with name, layers, init, forward, loss, backward and accuracy)."""
    if isinstance(model, str):
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; valid models are {', '.join(MODELS)}, or a model object")
        return MLP(MODELS[model], name=model)
    needed = ("name", "layers", "init", "forward", "loss", "backward", "accuracy")
    missing = [attribute for attribute in needed if not hasattr(model, attribute)]
    if missing:
        raise TypeError(f"model must be a name ({', '.join(MODELS)}) or a model object; "
                        f"{type(model).__name__} has no {', '.join(missing)}")
    return model


# ----------------------------------------------------------------------------- global batches and shards

def epoch_sampler(n, seed):
    """Chapter 04's sampler over all n training examples on one "rank": the whole seeded shuffle of
    an epoch, the same on every rank. Cutting it into global batches is global_batches' job."""
    return DistributedSampler(n, size=1, rank=0, seed=seed)


def global_batches(sampler, epoch, batch_size):
    """The global batches of `epoch`: set_epoch (forget it and every epoch repeats epoch 0's order),
    then consecutive batch_size slices of the shuffle; the last, shorter slice is dropped."""
    sampler.set_epoch(epoch)
    order = np.fromiter(sampler, dtype=np.int64, count=len(sampler))
    return [order[start:start + batch_size] for start in range(0, len(order) - batch_size + 1, batch_size)]


def shard_of(batch, size, rank):
    """This rank's block of a global batch: batch[block_range(len(batch), size, rank)]."""
    rows = block_range(len(batch), size, rank)
    return batch[rows.start:rows.stop]
