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


def test_twistd_observer_caps_the_file_twistd_would_write(tmp_path) -> None:
    path = tmp_path / "twistd.log"
    obs = twistd_observer({"logfile": str(path), "nodaemon": False}, max_bytes=10_000, max_files=1)
    assert obs is not None
    for i in range(1_000):
        obs({"log_format": "line {i} " + "y" * 80, "i": i, "log_level": LogLevel.info, "log_time": 0.0,
             "log_namespace": "t"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twistd.log", "twistd.log.1"]
    # where twistd writes to stdout or syslog it keeps its own observer
    assert twistd_observer({"logfile": None, "nodaemon": True}, 10_000, 1) is None
    assert twistd_observer({"logfile": "-", "nodaemon": True}, 10_000, 1) is None
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
