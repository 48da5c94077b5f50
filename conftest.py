"""Test-session hooks, for tests/ and for the notebooks nbval runs.

Every ipyparallel cluster started during the session (by a test or a notebook kernel, which inherits
this environment) carries a session tag in its id; at the end of the session any of them still
running is stopped, so a notebook whose last cell never ran leaves no engines behind.
"""
import os


def pytest_configure(config):
    os.environ.setdefault("SYNCML_CLUSTER_TAG", f"syncml-test-{os.getpid()}")
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an ignored
    # SIGINT: the tests that interrupt the runs would then find Ctrl-C lost. Give them Python's handler.
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session, exitstatus):
    from syncml_lib.cluster import stop_clusters

    stopped = stop_clusters(tag=os.environ["SYNCML_CLUSTER_TAG"])
    if stopped:
        print(f"\nconftest: stopped {len(stopped)} cluster(s) left running: {stopped}")


def pytest_runtest_teardown(item):
    """A test must leave Ctrl-C as it found it (pytest_configure): Python's default handler, which raises
    KeyboardInterrupt (a library that left another handler in place would swallow a learner's interrupt)."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    if handler is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise AssertionError(f"{item.nodeid} left SIGINT handled by {handler!r}, not Python's default handler")
