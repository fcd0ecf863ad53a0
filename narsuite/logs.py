"""Logging: twisted.logger everywhere, one level knob, optional JSON lines.

narsuite modules log through :func:`logger`, whose events pass a level
filter before reaching the global publisher, so ``[log] level`` applies to
our own chatter without fighting the observer twistd installs.  The JSON-lines
file, when configured, receives every event (ours and Twisted's) so it can be
shipped to a log pipeline as is.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
)

__all__ = ["logger", "set_level", "JsonFileLog", "LEVELS"]

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(lambda event: globalLogPublisher(event), [_predicate])


def logger(namespace: str | None = None) -> Logger:
    """A Logger whose events honour ``[log] level``, named after the calling module."""
    if namespace is None:
        namespace = sys._getframe(1).f_globals.get("__name__", "narsuite")
    return Logger(namespace=namespace, observer=_observer)


def set_level(level: str) -> None:
    _predicate.setLogLevelForNamespace("", LEVELS[level])


class JsonFileLog:
    """Adds a JSON-lines observer for the life of the daemon."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._observer: ILogObserver | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._observer = jsonFileLogObserver(self._file)
        globalLogPublisher.addObserver(self._observer)

    def stop(self) -> None:
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
            self._observer = None
        if self._file is not None:
            self._file.close()
            self._file = None
