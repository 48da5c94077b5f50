"""scaling.measure_step under real mpiexec: the same row on every rank, the idle ranks released, and a
failed training run or a bad rank count refused on every rank (no rank left waiting)."""
from syncml_lib.mpirun import run


def job(comm):
    from syncml_lib.scaling import measure_step
    from syncml_lib.training import get_model

    found = {"row": measure_step(comm, 2, model=get_model("mlp"), batch_size=64, epochs=1, rounds=1)}
    for case, kwargs in {"bad batch": dict(p=2, batch_size=0), "too many ranks": dict(p=comm.size + 1, batch_size=64)}.items():
        try:
            measure_step(comm, model=get_model("mlp"), epochs=1, rounds=1, **kwargs)
            found[case] = None
        except ValueError as error:
            found[case] = str(error)
    found["afterwards"] = measure_step(comm, 1, model=get_model("mlp"), batch_size=64, epochs=1, rounds=1)["ranks"]
    return found


def test_measure_step_agrees_on_every_rank_and_refuses_bad_runs_everywhere():
    reports = run(job, 3, timeout=60)
    row = reports[0]["row"]
    assert row["ranks"] == 2 and row["batch"] == 64 and row["steps"] == 1437 // 64 - 2  # warm-up left out
    assert row["step"] >= row["compute"] > 0 and row["bytes_sent"] > 0 and 0 < row["accuracy"] <= 1
    for rank, report in enumerate(reports):
        assert report["row"] == row, rank                                   # rank 2 only waited, and got it too
        assert "measure_step: on rank 0, train on the first 2 ranks failed: ValueError: train: batch_size" in report["bad batch"], rank
        assert "p must be a rank count from 1 to 3, got 4" in report["too many ranks"], rank
        assert report["afterwards"] == 1
