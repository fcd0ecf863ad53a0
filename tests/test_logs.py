"""Logging an attacker cannot use to fill the disk: the aggregator and capped log files."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent

from narsuite.logs import Aggregator, JsonFileLog, capped_file, twistd_observer


class _Events:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


def _agg(**kw):
    events = _Events()
    clock = Clock()
    agg = Aggregator(Logger(namespace="test", observer=events), "ike drops", clock, **kw)
    return agg, events, clock


def test_flood_gives_constant_lines_per_interval_with_exact_counts() -> None:
    agg, events, clock = _agg(interval=10.0, first=3)
    for n in (100, 100_000):
        events.events.clear()
        for i in range(n):
            agg.event("malformed" if i % 10 else "unknown_cookie", "dropped {i}: {reason}", i=i)
        clock.advance(10.0)
        # 3 in full per reason, then one summary line for the interval, whatever n is
        texts = events.texts()
        assert len(texts) == 3 + 3 + 1, texts
        summary = events.events[-1]
        assert summary["counts"] == {"malformed": n - n // 10, "unknown_cookie": n // 10}
        assert f"{n} in the last 10 s" in texts[-1] and f"{n - 6} not logged one by one" in texts[-1]
        assert texts[:3] == ["dropped 0: unknown_cookie", "dropped 1: malformed", "dropped 2: malformed"]
    assert agg.totals == {"malformed": 90_090, "unknown_cookie": 10_010}
    assert agg.summaries == 2


def test_quiet_intervals_cost_nothing_and_few_events_need_no_summary() -> None:
    agg, events, clock = _agg(interval=5.0, first=5)
    for i in range(4):
        agg.event("bad", "bad {i}", i=i)
    clock.advance(5.0)
    assert len(events.events) == 4 and agg.summaries == 0
    assert not clock.getDelayedCalls()  # idle: no timer left running
    agg.event("bad", "bad again")  # a new interval logs in full again
    assert len(events.events) == 5


def test_stop_logs_what_is_pending_and_cancels_the_timer() -> None:
    agg, events, clock = _agg(interval=60.0, first=1)
    for _ in range(10):
        agg.event("x", "x")
    agg.stop()
    assert not clock.getDelayedCalls()
    assert events.events[-1]["counts"] == {"x": 10}


def test_event_level_is_the_aggregators() -> None:
    agg, events, _clock = _agg(level=LogLevel.warn)
    agg.event("x", "x")
    assert events.events[0]["log_level"] is LogLevel.warn


def test_capped_file_rotates_and_keeps_max_files(tmp_path) -> None:
    f = capped_file(tmp_path / "logs" / "narsuite.log", max_bytes=10_000, max_files=2)
    line = "x" * 99 + "\n"
    for _ in range(2_000):  # 200 kB through a 10 kB x (2 + 1) budget
        f.write(line)
    f.close()
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["narsuite.log", "narsuite.log.1", "narsuite.log.2"]
    assert all((tmp_path / "logs" / n).stat().st_size <= 10_000 + len(line) for n in files)


def test_twistd_observer_caps_the_file_twistd_would_write(tmp_path, monkeypatch) -> None:
    path = tmp_path / "twistd.log"
    obs = twistd_observer({"logfile": str(path), "nodaemon": False}, max_bytes=10_000, max_files=1)
    assert obs is not None
    for i in range(1_000):
        obs({"log_format": "line {i} " + "y" * 80, "i": i, "log_level": LogLevel.info, "log_time": 0.0,
             "log_namespace": "t"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twistd.log", "twistd.log.1"]
    # where twistd writes to stdout: the same (faster) text lines there; syslog is twistd's own
    import io

    for opts in ({"logfile": None, "nodaemon": True}, {"logfile": "-", "nodaemon": True}):
        monkeypatch.setattr("sys.stdout", io.StringIO())
        obs = twistd_observer(opts, 10_000, 1)
        assert obs is not None
        obs({"log_format": "to stdout {i}", "i": 1, "log_level": LogLevel.info, "log_time": 0.0,
             "log_namespace": "t"})
        assert "[t#info] to stdout 1\n" in __import__("sys").stdout.getvalue()
    assert twistd_observer({"syslog": True, "logfile": None}, 10_000, 1) is None


def test_json_log_is_capped(tmp_path) -> None:
    from twisted.logger import globalLogPublisher

    j = JsonFileLog(tmp_path / "j.jsonl", max_bytes=10_000, max_files=1)
    j.start()
    try:
        log = Logger(namespace="t")
        for i in range(500):
            log.info("event {i} " + "z" * 80, i=i)
    finally:
        j.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.jsonl", "j.jsonl.1"]
    assert globalLogPublisher  # the observer was removed in stop (no error on later events)


def test_text_observer_writes_what_twisteds_text_observer_writes() -> None:
    """narsuite.logs.text_observer (the fast path) against twisted's textFileLogObserver,
    over the kinds of events there are: simple fields, format specs, calls, missing keys,
    failures, multi-line text, no time, an explicit system, bytes formats, legacy events."""
    import io

    from twisted.logger import eventAsJSON, eventFromJSON, textFileLogObserver
    from twisted.python.failure import Failure

    from narsuite.logs import text_observer

    class Thing:
        def __str__(self) -> str:
            return "thing"

        def name(self) -> str:
            return "called"

    try:
        raise ZeroDivisionError("for the traceback")
    except ZeroDivisionError:
        failure = Failure()
    base = {"log_level": LogLevel.info, "log_namespace": "narsuite.x", "log_time": 1_765_000_000.75}
    events = [
        {"log_format": "ikev2: {name}: {who} at {addr} established", "name": "ab12", "who": "c.example",
         "addr": "192.0.2.1:4500"},
        {"log_format": "spi {spi:#010x} n {n:.2f}", "spi": 0x1234, "n": 2.0},
        {"log_format": "call {t.name()} and {t}", "t": Thing()},
        {"log_format": "missing {nope}"},
        {"log_format": "two\nlines {x}", "x": "and\na third"},
        {"log_format": "{x}", "x": ""},
        {"log_format": "no time {x}", "x": 1, "log_time": None},
        {"log_format": "system {x}", "x": 1, "log_system": "-"},
        {"log_format": b"bytes {x}", "x": 1},
        {"log_format": "failed {x}", "x": 1, "log_failure": failure},
        {"log_format": "braces {{literal}} {x}", "x": 1},
        {"log_format": "unicode \u00e9 {x}", "x": "\u2603", "log_level": LogLevel.warn},
        {"log_format": None},
        {"log_text": "legacy", "log_format": "{log_text}", "log_system": "legacy-system"},
        {"log_format": "no level {x}", "x": 1, "log_level": None},
        {"log_format": "next second {x}", "x": 2, "log_time": 1_765_000_001.01},
    ]
    flat = eventFromJSON(eventAsJSON({**base, "log_format": "flat {x!r}", "x": [1]}))
    ours, theirs = io.StringIO(), io.StringIO()
    fast, reference = text_observer(ours), textFileLogObserver(theirs)
    for e in events + [flat] + events:  # twice: the cached formats and times must agree too
        event = {**base, **e}
        fast(event)
        reference(event)
    assert ours.getvalue() == theirs.getvalue()
    assert "ikev2: ab12: c.example at 192.0.2.1:4500 established" in ours.getvalue()
