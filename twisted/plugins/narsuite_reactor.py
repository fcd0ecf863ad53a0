"""twistd reactor plugin: ``twistd --reactor=narsuite-epoll -n narsuite ...`` (see narsuite.reactor)."""

from twisted.application.reactors import Reactor

narsuite_epoll = Reactor(
    "narsuite-epoll", "narsuite.reactor",
    "epoll without the per-event log context (narsuite's data planes; opt-in)",
)
