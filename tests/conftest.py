"""Shared test setup: the network lab's fixtures (lab, nar_topo, ra_topo, mip_topo), and a
check that no test leaves an unhandled error in a Deferred (what trial does).

A Deferred that is garbage-collected while holding a Failure logs "Unhandled error in
Deferred" and nothing else happens: a store write whose Conflict nobody handles, say,
passes silently.  Every test here is watched: errors that Twisted reports while the test
runs, or when the garbage collector runs right after it, fail that test with the
failure's traceback.  A test that provokes such an error on purpose takes the
``deferred_errors`` fixture and empties the list it gets once it has checked it.
"""

from __future__ import annotations

import gc

import pytest
from twisted.logger import globalLogPublisher

pytest_plugins = ["narsuite.lab.pytest_plugin"]


class _UnhandledDeferredErrors:
    """Collects the failures Twisted logs for garbage-collected Deferreds (twisted.internet.defer)."""

    def __init__(self) -> None:
        self.failures: list = []

    def __call__(self, event: dict) -> None:
        if event.get("log_namespace") == "twisted.internet.defer" and event.get("log_failure") is not None:
            self.failures.append(event["log_failure"])


@pytest.fixture
def deferred_errors(_no_unhandled_deferred_errors):
    """The unhandled Deferred failures seen so far in this test; clear it to accept them."""
    return _no_unhandled_deferred_errors.failures


@pytest.fixture(autouse=True)
def _no_unhandled_deferred_errors():
    gc.collect()  # what earlier tests left behind is theirs, not this test's
    watcher = _UnhandledDeferredErrors()
    globalLogPublisher.addObserver(watcher)
    try:
        yield watcher
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(watcher)
    if watcher.failures:
        shown = "\n".join(f.getTraceback() for f in watcher.failures[:3])
        pytest.fail(f"{len(watcher.failures)} unhandled error(s) in Deferreds:\n{shown}", pytrace=False)
