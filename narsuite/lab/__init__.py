"""The network lab: namespaces, links, switches and NATs for integration tests.

See ``docs/lab.md``.  Typical use::

    from narsuite.lab import Lab, nar_topology

    with Lab() as lab:
        t = nar_topology(lab)
        assert t.x.ping(t.n_public)
"""

from .netns import (
    DEFAULT_PREFIX,
    CommandError,
    Host,
    Lab,
    LabError,
    Link,
    Segment,
    SegmentPort,
    lab_namespaces,
    lab_unavailable_reason,
    parse_netns_name,
    sweep_stale,
)
from .topologies import (
    MipTopology,
    NarTopology,
    RemoteAccessTopology,
    mip_topology,
    nar_topology,
    remote_access_topology,
)

__all__ = [
    "DEFAULT_PREFIX",
    "CommandError",
    "Host",
    "Lab",
    "LabError",
    "Link",
    "MipTopology",
    "NarTopology",
    "RemoteAccessTopology",
    "Segment",
    "SegmentPort",
    "lab_namespaces",
    "lab_unavailable_reason",
    "mip_topology",
    "nar_topology",
    "parse_netns_name",
    "remote_access_topology",
    "sweep_stale",
]
