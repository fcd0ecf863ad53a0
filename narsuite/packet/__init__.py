"""Packet-level code: the wire codec and per-packet helpers."""
