"""The MPI settings of everything the course starts, in one place. On one machine, nothing listens
beyond loopback.

    command = [launcher(), "-n", "4", sys.executable, "script.py"]
    subprocess.run(command, env=mpi_environment())

On one machine (the default) the course starts its MPI jobs (the notebooks' engines, syncml_lib.mpirun,
the tests, the benchmarks) with these settings:

    mpiexec.gforker                      MPICH's forking process manager: it starts the ranks on this
                                         machine and talks to them over pipes. Hydra's `mpiexec`, MPICH's
                                         default, listens on every interface (0.0.0.0, a random port: the
                                         control port its proxies on other machines connect back to).
    UCX_TLS=sm,self                      the MPICH wheel's network module (UCX) moves messages through
                                         shared memory only; by default it also listens with TCP on every
                                         address of the machine, for ranks elsewhere.
    MPIR_CVAR_CH4_PROGRESS_THROTTLE=1    a rank waiting inside MPI yields its core instead of spinning
                                         (more ranks than cores: 4 engines on 2 cores).

The network path on one machine: SYNCML_NETWORK=loopback gives Hydra's mpiexec and makes every message
go through TCP sockets on the loopback interface, as between machines (the test suite runs the core cases
so, and `make bench` measures what it costs):
    MPIR_CVAR_CH4_NETMOD=ofi             MPICH's libfabric network module (UCX's TCP transport refuses the
                                         loopback device here: "Destination is unreachable")
    FI_PROVIDER=tcp, FI_TCP_IFACE=lo     libfabric's TCP provider, on the loopback interface
    MPIR_CVAR_NOLOCAL=1                  every rank counts as on another machine: no shared memory
Across machines: SYNCML_NETWORK=1 in the environment gives Hydra's mpiexec (host files, ssh) and
UCX's own choice of transports. Then mpiexec listens on 0.0.0.0 at a random port (MPIEXEC_PORT_RANGE
=low:high confines it to a range a firewall can name), and each rank listens on the machine's
addresses for the ranks of other machines.
"""
import os
from pathlib import Path

__all__ = ["launcher", "mpi_settings", "mpi_environment", "set_in_this_process", "across_machines",
           "remove_leaked_shared_memory", "NETWORK_VARIABLE"]

NETWORK_VARIABLE = "SYNCML_NETWORK"
THROTTLE = "MPIR_CVAR_CH4_PROGRESS_THROTTLE"
SHARED_MEMORY_ONLY = {"UCX_TLS": "sm,self"}
TCP_ON_LOOPBACK = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": "lo", "MPIR_CVAR_NOLOCAL": "1"}


def across_machines():
    """True if the environment opts into the network path: across machines (SYNCML_NETWORK=1), or over TCP on
    this machine's loopback interface (SYNCML_NETWORK=loopback)."""
    return os.environ.get(NETWORK_VARIABLE, "") in ("1", "loopback")


def mpi_settings(throttle=True):
    """The environment variables the course sets for MPI (see the module's docstring), each with the
    value the user's environment gives it where it has one: a variable the user set wins.
    throttle=False leaves MPICH's progress throttle out (a benchmark whose every rank is busy)."""
    defaults = {THROTTLE: "1"} if throttle else {}
    if os.environ.get(NETWORK_VARIABLE, "") == "loopback":
        defaults.update(TCP_ON_LOOPBACK)
    elif not across_machines():
        defaults.update(SHARED_MEMORY_ONLY)
    return {name: os.environ.get(name, value) for name, value in defaults.items()}


def mpi_environment(base=None):
    """`base` (default: os.environ) with the course's MPI settings, for mpiexec and its ranks."""
    return {**(os.environ if base is None else base), **mpi_settings()}


def launcher():
    """The mpiexec to start the course's MPI jobs with: MPICH's mpiexec.gforker beside this Python's
    Hydra mpiexec on one machine, Hydra's own with SYNCML_NETWORK=1 (or where there is no gforker)."""
    from .mpirun import mpiexec_path

    hydra = mpiexec_path()
    forker = Path(hydra).with_name("mpiexec.gforker")
    if across_machines() or not forker.exists():
        return hydra
    return str(forker)


def set_in_this_process(throttle=True):
    """Put the course's MPI settings into os.environ, for MPI started by this process: call before
    mpi4py.MPI is imported (a benchmark that a plain mpiexec started does)."""
    os.environ.update(mpi_settings(throttle))


def remove_leaked_shared_memory(older_than=10.0):
    """Delete MPICH's shared-memory segments (/dev/shm/mpich_shm_*) of this user that no living process
    maps and that are older than `older_than` seconds; return their paths.

    MPICH removes a job's segment when the job ends, but not when its ranks are killed or aborted (a
    timeout, a rank that raised, an engine stopped). The segment's name comes from the job's id, which
    a later job can get again once process ids wrap around; that job then fails in MPI_Init with "Out
    of memory" (MPIDI_POSIX_comm_bootstrap). Every mpiexec job the course starts calls this first.
    """
    import glob
    import time

    candidates = []
    for path in glob.glob("/dev/shm/mpich_shm_*"):
        try:
            info = os.stat(path)
        except OSError:
            continue
        if info.st_uid == os.getuid() and time.time() - info.st_mtime > older_than:
            candidates.append(path)
    if not candidates:
        return []
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(None, 5)[-1].strip() for line in f if "/dev/shm/mpich_shm_" in line)
        except OSError:
            continue
    removed = []
    for path in candidates:
        if path not in mapped:
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed
