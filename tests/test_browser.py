"""The course as a learner meets it: `make lab`, driven in a real headless Chromium by Playwright.

Chapter 00 from the file browser, Run All Cells from the menu; an exercise up to its first check;
the kernel shut down from the Kernel menu, and then nothing of the cluster left running. Screenshots
of every step go to build/browser-test/. Needs Debian's `chromium` (apt install chromium) and
Playwright (`pip install -e '.[browser]'`); `.ci/run` installs both. Without them it is skipped.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import time

import pytest

from helpers import ROOT, free_port, start_make_lab, stop_process_group

CHROMIUM = os.environ.get("SYNCML_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed: `.venv/bin/pip install -e '.[browser]'` (CI does)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: `apt install chromium` (or SYNCML_CHROMIUM=/path/to/chrome); CI does")

SHOTS = ROOT / "build" / "browser-test"
CHAPTER = "00_setup_and_tour.ipynb"
# Chromium as root, offline: without the background-networking flags it keeps calling Google's hosts
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def cluster_processes():
    """PIDs of this checkout's engines, controllers, mpiexec and cluster watchers."""
    import psutil

    venv, found = str(ROOT / ".venv"), []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if venv in line and re.search(r"ipyparallel|mpiexec|hydra_pmi_proxy|syncml_lib\.cluster", line):
            found.append(proc.info["pid"])
    return found


@pytest.fixture
def lab(tmp_path):
    """`make lab` on a free port with a known token, in settings and workspace folders of its own (no
    autosave, so the test never writes into the committed notebooks); yields (url, log file)."""
    port, token = free_port(), "syncml-browser-test"
    settings = tmp_path / "settings" / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    os.environ["JUPYTERLAB_SETTINGS_DIR"] = str(tmp_path / "settings")
    os.environ["JUPYTERLAB_WORKSPACES_DIR"] = str(tmp_path / "workspaces")
    try:
        server = start_make_lab(port, lab_args=f"--no-browser --IdentityProvider.token={token} "
                                               "--LabApp.expose_app_in_browser=True")
    finally:
        del os.environ["JUPYTERLAB_SETTINGS_DIR"], os.environ["JUPYTERLAB_WORKSPACES_DIR"]
    log = []
    try:
        yield f"http://127.0.0.1:{port}/?token={token}", server, log  # redirects to make lab's notebooks/
    finally:
        stop_process_group(server)
        log.append(server.stdout.read())


class Learner:
    """The page, and what a learner does on it: menus, the file browser, waiting for the kernel."""

    def __init__(self, page):
        self.page, self.step = page, 0

    def shot(self, name):
        self.step += 1
        self.page.screenshot(path=str(SHOTS / f"{self.step:02d}_{name}.png"))

    def menu(self, top, item):
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
        self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}")).first.click()

    def open_from_file_browser(self, *names):
        listing = self.page.locator(".jp-DirListing-content")
        for name in names:
            listing.locator(".jp-DirListing-itemText", has_text=re.compile(f"^{re.escape(name)}$")).dblclick()
        self.page.locator(".jp-NotebookPanel:visible .jp-Notebook").wait_for()
        self.wait_idle(60)

    def notebook(self):
        """The open notebook's cells, from JupyterLab's own model (the page exposes the app)."""
        return self.page.evaluate("""() => {
            const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
            return Array.from({length: cells.length}, (_, i) => {
                const cell = cells.get(i);
                return {type: cell.type, count: cell.type === 'code' ? cell.executionCount : null,
                        tags: cell.getMetadata('tags') || [],
                        outputs: cell.type === 'code' ? cell.outputs.toJSON() : []};
            });
        }""")

    def queued_cells(self):
        """How many cells of the open notebook show the busy prompt [*]."""
        return self.page.evaluate("""() => Array.from(document.querySelectorAll(
            '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-InputPrompt')).filter(p => p.textContent.includes('*')).length""")

    def kernel_status(self):
        return self.page.evaluate("""() => {
            const session = window.jupyterapp.shell.currentWidget.sessionContext;
            return session.session && session.session.kernel ? session.session.kernel.status : 'none';
        }""")

    def wait_idle(self, seconds, meanwhile=lambda: None):
        """Wait until the kernel is idle and no cell is queued ("[*]"), twice in a row half a second apart
        (the kernel is briefly idle between the cells of Run All), calling meanwhile() every half second."""
        deadline = time.monotonic() + seconds
        quiet = 0
        while time.monotonic() < deadline:
            meanwhile()
            quiet = quiet + 1 if self.kernel_status() == "idle" and not self.queued_cells() else 0
            if quiet == 2:
                return
            time.sleep(0.5)
        raise AssertionError(f"the kernel was still {self.kernel_status()!r} after {seconds} s; see {SHOTS}")


def test_a_learner_runs_chapter_00_and_an_exercise_in_jupyterlab_and_shutting_down_stops_the_engines(lab):
    url, server, log = lab
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    committed = {p: hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in [ROOT / "notebooks" / CHAPTER, ROOT / "exercises" / CHAPTER]}
    before = set(cluster_processes())
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            learner = Learner(page)
            deadline = time.monotonic() + 90
            while True:  # `make lab` installs first on a fresh clone; then the server needs a moment
                try:
                    page.goto(url, timeout=5000)
                    break
                except playwright_api.Error:
                    assert time.monotonic() < deadline and server.poll() is None, "JupyterLab did not come up"
                    time.sleep(1)
            page.locator(".jp-DirListing-content").wait_for(timeout=60000)
            learner.shot("lab_opened_at_notebooks")

            # chapter 00: from the file browser, clear, Run All Cells, wait for the kernel
            learner.open_from_file_browser(CHAPTER)
            kernel_name = page.locator(".jp-NotebookPanel:visible .jp-KernelName").inner_text()
            assert kernel_name.strip() == "Python (syncml)"
            assert not page.get_by_text("official Jupyter news").is_visible(), "the news prompt is showing"
            learner.menu("Edit", "Clear Outputs of All Cells")
            assert all(c["count"] is None for c in learner.notebook() if c["type"] == "code")
            learner.shot("chapter_00_opened_and_cleared")
            started = time.monotonic()
            learner.menu("Run", "Run All Cells")
            seen = set()  # the cluster's processes while the chapter runs (its last cell stops them)
            learner.wait_idle(120, meanwhile=lambda: seen.update(cluster_processes()))
            took = time.monotonic() - started
            learner.shot("chapter_00_ran")
            cells = [c for c in learner.notebook() if c["type"] == "code"]
            assert [c["count"] for c in cells] == list(range(1, len(cells) + 1)), "not every cell ran once, in order"
            errors = [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
            assert not errors, f"error outputs: {[e['ename'] + ': ' + e['evalue'] for e in errors]}"
            figures = sum("image/png" in o.get("data", {}) for c in cells for o in c["outputs"])
            assert figures >= 1
            page.wait_for_function(
                f"document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-RenderedImage img').length >= {figures}")
            rendered = page.evaluate("""() => Array.from(document.querySelectorAll(
                '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-RenderedImage img')).filter(i => i.naturalWidth > 0).length""")
            assert rendered >= figures, f"{rendered} of {figures} figures rendered"
            print(f"chapter 00: {len(cells)} cells in {took:.0f} s, {figures} figures")

            assert seen - before, "no engine was seen running during chapter 00"
            assert not _still_running(seen - before, 5), "chapter 00's last cell left its cluster running"
            learner.menu("Kernel", "Shut Down Kernel")
            accept_dialog(page)

            # an exercise, up to its first check: the check's message, not the library's frames; then the
            # kernel shut down from the Kernel menu, its cluster still running, stops every engine
            page.locator(".jp-BreadCrumbs-home").click()
            learner.open_from_file_browser("exercises", CHAPTER)
            cells = learner.notebook()
            first_check = next(i for i, c in enumerate(cells) if "check" in c["tags"])
            page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell").nth(first_check).click()
            learner.menu("Run", "Run All Above Selected Cell")
            time.sleep(2)
            learner.wait_idle(120)
            learner.menu("Run", "Run Selected Cell")
            time.sleep(2)
            learner.wait_idle(120)
            check_cell = page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell").nth(first_check)
            check_cell.scroll_into_view_if_needed()
            learner.shot("exercise_00_first_check")
            shown = check_cell.locator(".jp-OutputArea").inner_text()
            assert "CheckFailed: check_global_mean: failed on 4 of 4 ranks" in shown, shown
            assert "NotImplementedError: the exercise is not written yet" in shown, shown
            assert "check_global_mean(global_mean, view)" in shown, "the learner's call is shown"
            assert "syncml_lib" not in shown and "harness" not in shown, f"the check's own frames are shown:\n{shown}"
            running = set(cluster_processes()) - before
            assert running, "the exercise's cluster is not running before the kernel is shut down"
            learner.menu("Kernel", "Shut Down Kernel")
            accept_dialog(page)
            left = _still_running(running, 15)
            learner.shot("exercise_00_kernel_shut_down")
            assert not left, f"processes left 15 s after the kernel shut down: {left}"
        finally:
            browser.close()
    for path, digest in committed.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"the test changed {path}"
    stop_process_group(server)
    log.append(server.stdout.read())
    text = "".join(log)
    bad = [line for line in text.splitlines() if re.search(r"Traceback|\[E |ERROR|DEBUG", line)]
    assert not bad, "the JupyterLab server's log shows errors:\n" + "\n".join(bad[:20])


def accept_dialog(page):
    """Click the accept button of the dialog JupyterLab may ask its question in (Shut Down Kernel?)."""
    dialog = page.locator(".jp-Dialog")
    with contextlib.suppress(playwright_api.Error):
        dialog.wait_for(timeout=3000)
    if dialog.count():
        dialog.locator("button.jp-mod-accept").click()


def _still_running(pids, seconds):
    from helpers import still_alive_after

    return still_alive_after(list(pids), seconds)
