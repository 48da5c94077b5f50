"""The chapter notebooks on a cluster that was already running (SYNCML_PROFILE, issue #25): the session
starts one with `ipcluster start --profile ... --engines=mpi -n 4 --daemonize` (conftest.py), the chapter
notebooks run under nbval attached to it, and this test, which runs after them, finds that cluster still
running on the same engines, whose controller's record of requests (its task database) holds every %px
cell of chapters 00 and 03."""
import os

import nbformat
import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAPTERS = ("00_setup_and_tour.ipynb", "03_allreduce.ipynb")


def px_code(chapter):
    """What each %px / %%px cell of the chapter sends to the engines (the code after the magic)."""
    nb = nbformat.read(os.path.join(ROOT, "notebooks", chapter), as_version=4)
    sent = []
    for cell in nb.cells:
        source = cell.source.lstrip() if cell.cell_type == "code" else ""
        if source.startswith("%%px"):
            sent.append(source.split("\n", 1)[1])
        elif source.startswith("%px "):
            sent.append(source[len("%px "):])
    return sent


@pytest.mark.after_notebooks
def test_chapters_00_and_03_ran_on_the_running_cluster_which_keeps_running():
    ran = conftest._shared.get("notebooks", set())
    if not set(CHAPTERS) <= ran:
        pytest.skip(f"chapters 00 and 03 did not both run attached in this session (SYNCML_SHARED_CLUSTER=0, "
                    f"or not collected); ran: {sorted(ran)}")
    import ipyparallel as ipp

    client = ipp.Client(profile=conftest._shared["profile"], timeout=30)
    try:
        pids = sorted(client[:].apply_sync(os.getpid))
        requests = client.db_query({}, keys=["header", "content"])
    finally:
        client.close()
    assert pids == conftest._shared["pids"], "the engines the session started are not the ones running now"
    executed = {r["content"]["code"].strip() for r in requests if r["header"]["msg_type"] == "execute_request"}
    for chapter in CHAPTERS:
        missing = [code for code in px_code(chapter) if code.strip() not in executed]
        assert px_code(chapter) and not missing, (chapter, missing[:2])
