"""The lean epoll reactor of narsuite's data planes (``twistd narsuite``'s default, ``narsuite-epoll``).

Twisted's epoll reactor wraps every ready descriptor's event in
``log.callWithLogger(selectable, ...)``: a ``logPrefix()`` call, a copy of the
log context dict and a ``context.call`` frame, only so that legacy
``twisted.python.log.msg`` calls made while handling the event carry the
protocol's prefix as their ``system``.  Profiles of the SOCKS server (docs/bench-socks.md)
put that at about a fifth of the CPU per UDP datagram.  narsuite logs with
``twisted.logger`` and does not use that context.

:class:`NarsuiteEPollReactor` is Twisted's ``EPollReactor`` with one method
replaced: ``doPoll`` hands each ready selectable to ``_doReadOrWrite``
directly, and handles the most common event, readable and nothing else, inline
the way ``_doReadOrWrite`` handles it (the ``fileno() == -1`` check, ``doRead``,
an exception logged, a returned reason or exception disconnecting).
Everything else is Twisted's: registration, the waker, timers,
threads, signals, process support, and the error handling of
``_doReadOrWrite`` (an exception from ``doRead``/``doWrite`` is logged and the
selectable is disconnected with that failure).  What can still escape
``_doReadOrWrite`` (an exception from ``connectionLost`` itself, say) is
logged here with twisted.logger, as ``callWithLogger`` would log it, and the
loop goes on with the next event.

The one visible difference: legacy ``log.msg``/``log.err`` events emitted
while an event is handled have ``system`` ``"-"`` instead of the protocol's
``logPrefix()`` (twisted.logger events were never affected).

Install it before anything imports ``twisted.internet.reactor``::

    from narsuite import reactor
    reactor.install()

or run ``twistd --reactor=narsuite-epoll -n narsuite ...`` (the plugin is
``twisted/plugins/narsuite_reactor.py``).  ``twistd narsuite`` installs it by itself
unless twistd's ``--reactor`` chose another or ``[daemon] reactor = "twisted"``
(``narsuite.tap.install_reactor``).
"""

from __future__ import annotations

import errno
import select
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.logger import Logger
from twisted.python import log as legacy_log

__all__ = ["NAME", "NarsuiteEPollReactor", "install", "RawHandler"]

#: The name twistd knows this reactor by (``--reactor=narsuite-epoll``).
NAME = "narsuite-epoll"

_log = Logger(namespace="narsuite.reactor")
#: An event that is only "readable" (no hang-up, no error, no writability).
_READABLE = select.EPOLLIN

#: What a raw descriptor registers: called with the epoll event mask of each event.
RawHandler = Callable[[int], Any]


class NarsuiteEPollReactor(EPollReactor):
    """Twisted's epoll reactor without the per-event log context, plus raw descriptors.

    Raw descriptors (:meth:`add_fd`) are for code that drives its sockets
    itself (narsuite.nar.lean, the SOCKS CONNECT relay): one callable per
    descriptor gets the epoll event mask, with no selectable object, no
    ``fileno()``/``doRead``/``doWrite`` indirection and no reader/writer
    bookkeeping.  The owner says what it waits for (``EPOLLIN``/``EPOLLOUT``;
    errors and hang-ups are always reported) and must :meth:`remove_fd` or
    :meth:`forget_fd` before it closes the descriptor.  Raw descriptors are
    not part of ``removeAll()``/``getReaders()``: their owner's service closes
    them.
    """

    def __init__(self) -> None:
        super().__init__()
        self._raw: dict[int, RawHandler] = {}

    def add_fd(self, fd: int, handler: RawHandler, events: int) -> None:
        """Register ``fd`` (not a selectable's) for ``events``; ``handler(mask)`` per event."""
        self._poller.register(fd, events)
        self._raw[fd] = handler

    def modify_fd(self, fd: int, events: int) -> None:
        """Wait for other ``events`` on a raw descriptor."""
        self._poller.modify(fd, events)

    def remove_fd(self, fd: int) -> None:
        """Stop watching a raw descriptor that stays open."""
        if self._raw.pop(fd, None) is not None:
            try:
                self._poller.unregister(fd)
            except OSError:
                pass

    def forget_fd(self, fd: int) -> None:
        """Drop a raw descriptor about to be closed (``close()`` takes it out of epoll
        without an ``epoll_ctl``: the socket is this process's only reference)."""
        self._raw.pop(fd, None)

    def doPoll(self, timeout: float | None) -> None:
        """Waits for events, then dispatches each ready selectable without ``callWithLogger``."""
        try:
            # As Twisted: at most one event per registered descriptor, -1 blocks.
            events = self._poller.poll(-1 if timeout is None else timeout,
                                       len(self._selectables) + len(self._raw))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise  # any other epoll_wait error is a bug; say so loudly, as Twisted does
        if not events:
            return
        get = self._selectables.get
        raw = self._raw.get
        dispatch = self._doReadOrWrite
        for fd, event in events:
            handler = raw(fd)
            if handler is not None:
                try:
                    handler(event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    _log.failure("Unhandled error while handling an event of raw descriptor {fd}", fd=fd)
                continue
            selectable = get(fd)
            if selectable is None:  # removed by an earlier event of this batch
                continue
            try:
                if event == _READABLE:
                    # The common case, readable and nothing else, inline: what
                    # _doReadOrWrite does for it, without its frame and flag tests.
                    try:
                        why = _NO_FILEDESC if selectable.fileno() == -1 else selectable.doRead()
                    except BaseException:
                        why = sys.exc_info()[1]
                        legacy_log.err()  # as _doReadOrWrite: logged, then the selectable is disconnected
                    if why:
                        self._disconnectSelectable(selectable, why, True)
                else:
                    dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                self._dispatchFailed(selectable)

    doIteration = doPoll

    @staticmethod
    def _dispatchFailed(selectable: Any) -> None:
        """Logs what escaped ``_doReadOrWrite``, with the selectable's prefix as ``log_system``.

        ``_doReadOrWrite`` has already disconnected the selectable when its
        ``doRead``/``doWrite`` failed; what arrives here failed during that
        disconnection, which Twisted's reactor also only logs.
        """
        try:
            system = selectable.logPrefix()
        except BaseException:
            system = "(buggy logPrefix method)"
        _log.failure("Unhandled error while handling an event of {selectable!r}",
                     selectable=selectable, log_system=system)


def install() -> NarsuiteEPollReactor:
    """Installs :class:`NarsuiteEPollReactor` as ``twisted.internet.reactor`` (like Twisted's install())."""
    from twisted.internet.main import installReactor

    from narsuite.twisted_private import check

    check()  # a Twisted without the private names this reactor uses: say which, before running
    reactor = NarsuiteEPollReactor()
    installReactor(reactor)
    return reactor
