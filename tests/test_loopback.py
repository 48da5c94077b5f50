"""On one machine nothing the course starts listens beyond loopback (syncml_lib/mpienv.py): the MPI
cluster of the notebooks, a plain mpiexec job of syncml_lib.mpirun, and `make lab` with a kernel.

Sockets are read from /proc (net/tcp, tcp6, udp, udp6, and each process's fd links to them), so the
test needs neither ss nor root. A TCP socket counts when it listens; a UDP socket when it is bound
to a port. Addresses in 127.0.0.0/8 and ::1 are loopback; anything else (0.0.0.0, ::, the machine's
own addresses) fails. The opt-in across machines (SYNCML_NETWORK=1) is checked to listen on every
interface, as the README says: Hydra's mpiexec, the one known exception, and the proof that the
reading finds such a socket."""
import ipaddress
import json
import os
import time
import urllib.request
from pathlib import Path


from helpers import descendants, free_port, start_make_lab, stop_process_group
from syncml_lib import mpienv
from syncml_lib.cluster import mpi_cluster
from syncml_lib.mpirun import run

TCP_LISTEN, UDP_UNCONNECTED = "0A", "07"


def _address(hex_address, family):
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if family == 4:
        raw = raw[::-1]
    else:  # four 32-bit words, each in host (little-endian) order
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return ipaddress.ip_address(raw), int(port, 16)


def bound_sockets():
    """{socket inode: (protocol, address, port)} of every listening TCP and bound UDP socket."""
    found = {}
    for protocol, family, state in (("tcp", 4, TCP_LISTEN), ("tcp6", 6, TCP_LISTEN), ("udp", 4, UDP_UNCONNECTED),
                                    ("udp6", 6, UDP_UNCONNECTED)):
        path = Path(f"/proc/net/{protocol}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == state:
                found[int(fields[9])] = (protocol, *_address(fields[1], family))
    return found


def listening(pids):
    """[(pid, process name, protocol, address, port)] of the sockets these processes listen on."""
    sockets, out = bound_sockets(), []
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:["):
                inode = int(link[len("socket:["):-1])
                if inode in sockets:
                    out.append((pid, name, *sockets[inode]))
    return out


def beyond_loopback(found):
    return [row for row in found if not row[3].is_loopback]


# ----------------------------------------------------------------------------- the settings

def test_the_settings_keep_mpi_on_shared_memory_and_let_the_user_and_the_opt_in_decide(monkeypatch):
    monkeypatch.delenv("UCX_TLS", raising=False)
    monkeypatch.delenv(mpienv.NETWORK_VARIABLE, raising=False)
    assert mpienv.mpi_settings() == {"MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1", "UCX_TLS": "sm,self"}
    assert mpienv.launcher().endswith("/mpiexec.gforker")
    monkeypatch.setenv("UCX_TLS", "sm,self,cma")                 # the user's own choice wins
    assert mpienv.mpi_settings()["UCX_TLS"] == "sm,self,cma"
    monkeypatch.delenv("UCX_TLS")
    monkeypatch.setenv(mpienv.NETWORK_VARIABLE, "1")              # across machines: MPI's own transports
    assert mpienv.mpi_settings() == {"MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1"}
    assert mpienv.launcher().endswith("/mpiexec")


# ----------------------------------------------------------------------------- the MPI cluster and mpiexec jobs

def test_the_notebooks_mpi_cluster_listens_on_loopback_only():
    with mpi_cluster(n=4, timeout=90) as view:
        totals = view.apply_sync(lambda: __import__("mpi4py.MPI").MPI.COMM_WORLD.allreduce(1))  # MPI is up
        found = listening(descendants())
    assert totals == [4] * 4
    assert any(row[1].startswith(("python", "ipcontroller")) for row in found), found  # the controller, on loopback
    assert beyond_loopback(found) == [], beyond_loopback(found)


def sockets_of_this_job(comm):
    """On rank 0, once every rank has talked: the sockets that the job's processes (its mpiexec and
    everything below it) listen on."""
    comm.allreduce(comm.rank)
    found = None
    if comm.rank == 0:
        launcher = os.getpid()
        while not _name(launcher).startswith("mpiexec"):
            launcher = int(Path(f"/proc/{launcher}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the parent
        found = [(pid, name, protocol, str(address), port)
                 for pid, name, protocol, address, port in listening([launcher] + descendants(launcher))]
    comm.Barrier()
    return found


def _name(pid):
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_a_plain_mpiexec_job_listens_on_no_network_socket():
    found = run(sockets_of_this_job, 3, timeout=60)[0]
    assert [row for row in found if not ipaddress.ip_address(row[3]).is_loopback] == [], found


def test_across_machines_hydras_mpiexec_listens_on_every_interface_the_known_exception(monkeypatch):
    monkeypatch.setenv(mpienv.NETWORK_VARIABLE, "1")
    found = run(sockets_of_this_job, 2, timeout=60)[0]
    everywhere = [row for row in found if row[1] == "mpiexec" and row[3] in ("0.0.0.0", "::")]
    assert everywhere, found


# ----------------------------------------------------------------------------- make lab and its kernels

def test_make_lab_and_a_kernel_it_starts_listen_on_loopback_only():
    port, token = free_port(), "loopback-test"
    lab = start_make_lab(port, f"--no-browser --IdentityProvider.token={token}")
    try:
        kernel, deadline = None, time.monotonic() + 120
        while kernel is None and time.monotonic() < deadline and lab.poll() is None:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/kernels", method="POST",
                                             data=json.dumps({"name": "syncml"}).encode(),
                                             headers={"Authorization": f"token {token}"})
            try:
                with urllib.request.urlopen(request, timeout=5) as reply:
                    kernel = json.load(reply)
            except OSError:
                time.sleep(0.5)
        assert kernel is not None, f"JupyterLab did not start a kernel on port {port}"
        time.sleep(3)  # the kernel process binds its sockets
        found = listening(descendants(lab.pid))
    finally:
        stop_process_group(lab)
    assert any(row[4] == port for row in found), found                        # the server itself
    assert len({row[0] for row in found}) >= 2, found                         # and the kernel's process
    assert beyond_loopback(found) == [], beyond_loopback(found)
