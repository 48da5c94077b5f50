"""The network path, on one machine: with SYNCML_NETWORK=loopback (syncml_lib/mpienv.py) the MPI jobs start
with Hydra's mpiexec, every rank counts as on another machine (no shared memory), and the messages go
through TCP sockets on the loopback interface (MPICH's ofi netmod, libfabric's tcp provider). Shown from
/proc: each rank has an established TCP connection to every other rank of its job, which the default
settings (shared memory) do not open. Then the core cases of the allreduce, parameter-server and training
tests run that way, against the same references as there."""
import os

import numpy as np
import pytest

from syncml_lib import mpienv
from syncml_lib.mpirun import run


@pytest.fixture
def over_tcp(monkeypatch):
    monkeypatch.setenv(mpienv.NETWORK_VARIABLE, "loopback")


def tcp_connections(comm):
    """After a 1 MB allreduce: (this rank's pid, [(local address, remote address)] of the ESTABLISHED TCP
    sockets this process holds, from /proc/net/tcp and /proc/self/fd), and whether the sum was right."""
    from mpi4py import MPI

    x = np.full(1 << 17, float(comm.rank))
    total = np.empty_like(x)
    comm.Allreduce(x, total, op=MPI.SUM)
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            mine.add(int(link[len("socket:["):-1]))
    established = []
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[9]) in mine:          # 01: ESTABLISHED
            established.append((fields[1], fields[2]))
    right = bool(np.all(total == sum(range(comm.size))))
    return os.getpid(), established, right, os.environ.get("FI_PROVIDER")


LOOPBACK = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it


def connected_pairs(results):
    """{(rank a, rank b)}: a holds a TCP connection whose other end is a socket that rank b holds."""
    owner = {local: rank for rank, (_, established, _, _) in enumerate(results) for local, _ in established}
    return {(rank, owner[remote]) for rank, (_, established, _, _) in enumerate(results)
            for _, remote in established if remote in owner and owner[remote] != rank}


def test_over_the_network_path_the_ranks_talk_through_tcp_sockets_on_loopback(over_tcp, monkeypatch):
    results = run(tcp_connections, 3, timeout=60)
    assert all(right for _, _, right, _ in results)
    assert {provider for *_, provider in results} == {"tcp"}
    pairs = connected_pairs(results)
    assert pairs == {(a, b) for a in range(3) for b in range(3) if a != b}, results  # every rank with every other
    assert all(local.startswith(LOOPBACK) and remote.startswith(LOOPBACK)
               for _, established, _, _ in results for local, remote in established), results
    monkeypatch.delenv(mpienv.NETWORK_VARIABLE)                      # the default: shared memory, no socket
    assert connected_pairs(run(tcp_connections, 3, timeout=60)) == set()


def test_over_tcp_every_allreduce_matches_mpi_allreduce(over_tcp):
    from test_allreduce import job

    problems = sorted({problem for report in run(job, 3, timeout=120) for problem in report["problems"]})
    assert not problems, "\n".join(problems[:20])


def test_over_tcp_the_parameter_server_equals_the_sequential_reference(over_tcp):
    from test_parameter_server import MIXED, mixed_grad, sequential

    def bsp_with_two_servers(comm):
        from syncml_lib.parameter_server import run_parameter_server

        return run_parameter_server(comm, MIXED, mixed_grad, steps=6, lr=0.1, n_servers=2).params

    expected = sequential(MIXED, mixed_grad, steps=6, lr=0.1, n_workers=2)
    for params in run(bsp_with_two_servers, 4, timeout=120):
        for name in expected:
            np.testing.assert_allclose(params[name], expected[name], rtol=1e-12)


def test_over_tcp_training_equals_the_single_process_run(over_tcp):
    from syncml_lib.training import train
    from test_training import EQUAL, every_mechanism, max_error

    expected = train(None, "sequential", **dict(EQUAL, batch_size=61))
    everyone = run(every_mechanism, 3, 61, timeout=180)
    for name, params in everyone[0]["params"].items():
        assert max_error(params, expected.params) <= 1e-10, name
        assert all(max_error(everyone[r]["params"][name], params) == 0.0 for r in (1, 2)), name
