"""Shared test setup: the network lab's fixtures (lab, nar_topo, ra_topo, mip_topo)."""

pytest_plugins = ["narsuite.lab.pytest_plugin"]
