"""`make lab` serves JupyterLab on its port; the test stops it again."""
import json
import time
import urllib.request

from helpers import ROOT, alive, descendants, free_port, start_make_lab, stop_process_group


def test_make_lab_serves_jupyterlab_and_stops():
    port = free_port()
    lab = start_make_lab(port)
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
        stop_process_group(lab)
    log = lab.stdout.read()
    assert "JupyterLab application directory" in log and str(ROOT) in log, log
    time.sleep(0.5)
    assert alive(started) == []
