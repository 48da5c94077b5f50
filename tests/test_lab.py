"""`make lab` serves JupyterLab on its port; the test stops it again."""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

from helpers import ROOT, alive, descendants


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_lab_serves_jupyterlab_and_stops():
    port = free_port()
    lab = subprocess.Popen(["make", "lab", f"PORT={port}", "LAB_ARGS=--no-browser"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and lab.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=2) as reply:
                    status = json.load(reply)
                break
            except OSError:
                time.sleep(0.5)
        started = descendants(lab.pid)
        assert status is not None, f"JupyterLab did not answer on port {port}"
        assert "version" in status
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, signal.SIGKILL)
            lab.wait()
    log = lab.stdout.read()
    assert "JupyterLab application directory" in log and str(ROOT) in log, log
    time.sleep(0.5)
    assert alive(started) == []
