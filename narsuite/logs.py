"""Logging: twisted.logger everywhere, one level knob, optional JSON lines.

narsuite modules log through :func:`logger`, whose events pass a level
filter before reaching the global publisher, so ``[log] level`` applies to
our own chatter without fighting the observer twistd installs.  The JSON-lines
file, when configured, receives every event (ours and Twisted's) so it can be
shipped to a log pipeline as is.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
    jsonFileLogObserver,
    timeFormatRFC3339,
)

__all__ = ["logger", "set_level", "enabled", "JsonFileLog", "LEVELS", "Aggregator", "capped_file",
           "twistd_observer", "text_observer", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_FILES"]

#: Log files rotate at this size and keep this many rotated files unless ``[log]`` says otherwise:
#: a flood of bad input can then cost at most (max_files + 1) * max_bytes of disk.
DEFAULT_MAX_BYTES = 10_000_000
DEFAULT_MAX_FILES = 5

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def logger(namespace: str | None = None) -> Logger:
    """A Logger whose events honour ``[log] level``, named after the calling module."""
    if namespace is None:
        namespace = sys._getframe(1).f_globals.get("__name__", "narsuite")
    return Logger(namespace=namespace, observer=_observer)


def set_level(level: str) -> None:
    _predicate.setLogLevelForNamespace("", LEVELS[level])
    _level[0] = LEVELS[level]


#: the level ``set_level`` last set, for :func:`enabled`
_level = [LogLevel.info]


def enabled(level: LogLevel) -> bool:
    """Whether ``[log] level`` lets events of ``level`` through: one comparison, for a
    per-message path that should not build an event (Twisted's emit and filter cost
    microseconds) only for the filter to drop it."""
    return level >= _level[0]


def capped_file(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
                max_files: int = DEFAULT_MAX_FILES) -> Any:
    """A log file that rotates at ``max_bytes`` and keeps ``max_files`` rotated copies.

    twistd's own default (``LogFile.fromFullPath``) rotates at 1 MB but keeps every
    rotated file forever: an attacker who can make us log fills the disk.
    """
    from twisted.python.logfile import LogFile

    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return LogFile(path.name, str(path.parent), rotateLength=max_bytes, maxRotatedFiles=max_files,
                   defaultMode=0o640)


_FIELD = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


class _ClassicText:
    """``twisted.logger.textFileLogObserver``'s line for an event, byte for byte, faster.

    Twisted formats every event with ``string.Formatter`` written in Python (it supports
    ``{method()}`` calls) and builds a ``datetime`` for its timestamp: about 25 us a line,
    a twentieth of what an IKEv2 exchange costs its responder.  A format made only of
    ``{name}`` fields means the same to ``str.format_map`` (C), and the timestamp changes
    once a second; anything else (calls, format specs, failures, flattened or legacy
    events, a missing key) goes to Twisted's own formatter.
    """

    def __init__(self, time_format: str | None = timeFormatRFC3339) -> None:
        self.time_format = time_format
        self._simple: dict[str, bool] = {}
        #: (second, its text): one attribute, so a thread logging at the same time never
        #: pairs one second with another's text
        self._stamp: tuple[int | None, str] = (None, "")
        self._systems: dict[tuple[str, Any], str] = {}

    def _is_simple(self, fmt: str) -> bool:
        simple = self._simple.get(fmt)
        if simple is None:
            rest = _FIELD.sub("", fmt)
            simple = "{" not in rest and "}" not in rest
            if len(self._simple) < 4096:  # formats are the code's constants; bounded anyway
                self._simple[fmt] = simple
        return simple

    def _time(self, when: float | None) -> str:
        if when is None or self.time_format is None:
            return "-"
        if "%f" in self.time_format:
            return formatTime(when, self.time_format)
        second = int(when // 1)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = self._stamp = (second, formatTime(second, self.time_format))
        return stamp[1]

    def __call__(self, event: dict) -> str | None:
        fmt = event.get("log_format")
        if (type(fmt) is not str or "log_failure" in event or "log_flattened" in event
                or "log_system" in event or not self._is_simple(fmt)):
            return self._twisted(event)
        try:
            text = fmt.format_map(event)
        except Exception:  # a missing key: Twisted says so its own way
            return self._twisted(event)
        if not text:
            return None
        level = event.get("log_level")
        key = (event.get("log_namespace", "-"), level)
        system = self._systems.get(key)
        if system is None:
            system = f"{key[0]}#{'-' if level is None else level.name}"
            if len(self._systems) < 4096:
                self._systems[key] = system
        return f"{self._time(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"

    def _twisted(self, event: dict) -> str | None:
        return formatEventAsClassicLogText(event, formatTime=lambda e: formatTime(e, self.time_format))


def text_observer(out: IO[Any], time_format: str | None = timeFormatRFC3339) -> FileLogObserver:
    """What ``twisted.logger.textFileLogObserver(out)`` writes, formatted faster (:class:`_ClassicText`)."""
    return FileLogObserver(out, _ClassicText(time_format))


def twistd_observer(twistd_options: Any, max_bytes: int, max_files: int) -> ILogObserver | None:
    """The observer twistd would have made from its options, with its file capped.

    twistd writes to stdout under ``-n`` (or ``--logfile=-``), to syslog with
    ``--syslog``, else to a file (``twistd.log`` by default) through ``LogFile``,
    which rotates at 1 MB but never deletes a rotated file.  For the file case this
    returns a text observer on :func:`capped_file` (SIGUSR1 still rotates it), for stdout
    one on stdout -- both :func:`text_observer`, Twisted's lines formatted faster; for
    syslog None: twistd's own choice stands.
    """
    opts = twistd_options
    filename = opts.get("logfile")
    if opts.get("syslog"):
        return None
    if filename == "-" or (opts.get("nodaemon") and not filename):
        return text_observer(sys.stdout)
    log_file = capped_file(filename or "twistd.log", max_bytes, max_files)
    try:
        import signal

        if not signal.getsignal(signal.SIGUSR1):
            def rotate(_signum: int, _frame: Any) -> None:
                from twisted.internet import reactor
                from twisted.internet.interfaces import IReactorThreads

                IReactorThreads(reactor).callFromThread(log_file.rotate)

            signal.signal(signal.SIGUSR1, rotate)
    except ValueError:  # not the main thread (tests)
        pass
    return text_observer(log_file)


class Aggregator:
    """Logs repeated events without letting their sender fill the disk.

    Per reason and per interval the first ``first`` events are logged in full; the
    rest are only counted, and when the interval ends one summary line gives every
    reason's count (logged and suppressed).  A flood of N bad datagrams therefore
    costs at most ``reasons * first + 1`` lines per interval whatever N is, and the
    counts stay exact.  Reasons should come from a fixed set (the caller's counter
    names), never from the input: the set of reasons bounds the output.

    ``clock`` is the reactor (``callLater``); the summary is scheduled when the first
    event of an interval arrives, so an idle aggregator costs nothing.  Call
    :meth:`stop` when the owner stops (it logs what is pending).
    """

    def __init__(self, log: Logger, what: str, clock: Any = None, interval: float = 10.0,
                 first: int = 5, level: LogLevel = LogLevel.info) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.log = log
        self.what = what
        self.clock = clock
        self.interval = interval
        self.first = first
        self.level = level
        self.counts: Counter[str] = Counter()
        #: every event ever seen, by reason (the interval counts reset, these do not)
        self.totals: Counter[str] = Counter()
        self.summaries = 0
        self._call: Any = None

    def event(self, reason: str, format: str, **kw: Any) -> bool:
        """Count one event; log it in full if it is among the first of its reason. True if logged."""
        self.totals[reason] += 1
        n = self.counts[reason] = self.counts[reason] + 1
        if self._call is None:
            self._call = self.clock.callLater(self.interval, self._summary)
        if n <= self.first:
            self.log.emit(self.level, format, reason=reason, **kw)
            return True
        return False

    def _summary(self) -> None:
        self._call = None
        counts, self.counts = self.counts, Counter()
        suppressed = sum(max(0, n - self.first) for n in counts.values())
        if not suppressed:
            return
        self.summaries += 1
        detail = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
        self.log.emit(self.level, "{what}: {total} in the last {interval:.0f} s ({detail}); "
                      "{suppressed} not logged one by one (the first {first} of each reason are)",
                      what=self.what, total=sum(counts.values()), interval=self.interval, detail=detail,
                      suppressed=suppressed, first=self.first, counts=dict(counts))

    def stop(self) -> None:
        """Cancel the timer and log what the current interval holds."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self.counts:
            self._summary()
        self._call = None


class JsonFileLog:
    """Adds a JSON-lines observer for the life of the daemon (a capped, rotated file)."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_files: int = DEFAULT_MAX_FILES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._file: IO[str] | None = None
        self._observer: ILogObserver | None = None

    def start(self) -> None:
        self._file = capped_file(self.path, self.max_bytes, self.max_files)
        self._observer = jsonFileLogObserver(self._file)
        globalLogPublisher.addObserver(self._observer)

    def stop(self) -> None:
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
            self._observer = None
        if self._file is not None:
            self._file.close()
            self._file = None
