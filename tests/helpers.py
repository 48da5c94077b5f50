"""Small helpers shared by the tests."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def outcome(call):
    """Run call(); return None, or (exception name, message) if it raised TypeError or ValueError."""
    try:
        call()
    except (TypeError, ValueError) as error:
        return type(error).__name__, str(error)
    return None


def descendants(pid=None):
    """PIDs of all living processes below `pid` (default: this process), from /proc."""
    pid = os.getpid() if pid is None else pid
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            state, ppid = fields[0], int(fields[1])
            if state != "Z":
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pids):
    """The PIDs among `pids` that still run (zombies count as gone)."""
    living = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.append(pid)
    return living


def still_alive_after(pids, seconds=15):
    """Wait up to `seconds` for `pids` to end; return those still running then."""
    import time

    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def start_make_lab(port, lab_args="--no-browser"):
    """`make lab` on `port`, in a process group of its own (stop it with stop_process_group)."""
    import subprocess

    return subprocess.Popen(["make", "lab", f"PORT={port}", f"LAB_ARGS={lab_args}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop_process_group(proc, seconds=20):
    """SIGTERM to the process group of proc (started with start_new_session), SIGKILL if it is still
    there after `seconds`; then reap proc. Nothing if proc has already ended."""
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
