"""Test-session hooks, for tests/ and for the notebooks nbval runs.

Every ipyparallel cluster started during the session (by a test or a notebook kernel, which inherits
this environment) carries a session tag in its id; at the end of the session any of them still
running is stopped, so a notebook whose last cell never ran leaves no engines behind.
"""
import os


def pytest_configure(config):
    os.environ.setdefault("SYNCML_CLUSTER_TAG", f"syncml-test-{os.getpid()}")


def pytest_sessionfinish(session, exitstatus):
    from syncml_lib.cluster import stop_clusters

    stopped = stop_clusters(tag=os.environ["SYNCML_CLUSTER_TAG"])
    if stopped:
        print(f"\nconftest: stopped {len(stopped)} cluster(s) left running: {stopped}")
