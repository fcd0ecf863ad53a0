"""twistd plugin: ``twistd -n narsuite --role=...`` (see narsuite.tap)."""

from twisted.application.service import ServiceMaker

narsuite = ServiceMaker(
    "narsuite", "narsuite.tap", "IPsec and Mobile IP through NATs and VPN gateways", "narsuite"
)
