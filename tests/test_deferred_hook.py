"""The conftest hook fails a test that leaves an unhandled error in a Deferred."""

from __future__ import annotations

import gc

import pytest
from twisted.internet import defer

pytest_plugins = ["pytester"]


def test_a_dropped_failing_deferred_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((__import__("pathlib").Path(__file__).parent / "conftest.py").read_text()
                          .replace('pytest_plugins = ["narsuite.lab.pytest_plugin"]', ""))
    pytester.makepyfile(test_inner="""
        from twisted.internet import defer

        class Boom(Exception):
            pass

        def test_drops_it():
            d = defer.fail(Boom("nobody handles me"))
            del d

        def test_handles_it():
            d = defer.fail(Boom("handled"))
            d.addErrback(lambda f: None)
    """)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)  # the teardown check reports it as an error of that test
    result.stdout.fnmatch_lines(["*test_drops_it*", "*unhandled error(s) in Deferreds*", "*nobody handles me*"])


def test_the_fixture_lets_a_test_accept_an_expected_error(deferred_errors: list) -> None:
    d = defer.fail(ValueError("expected here"))
    del d
    gc.collect()
    assert [f.value.args[0] for f in deferred_errors] == ["expected here"]
    deferred_errors.clear()
