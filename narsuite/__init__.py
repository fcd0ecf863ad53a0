"""narsuite: Twisted servers that let IPsec and Mobile IP work through NATs and VPN gateways."""

__version__ = "0.1.0"
