"""The common mapping store (see :mod:`narsuite.store.core`)."""

from narsuite.store.backends import IStoreBackend, MemoryBackend, Row, SqliteBackend, StoreBackendError
from narsuite.store.core import AddressPool, Change, Conflict, Exhausted, Store, UnknownKind
from narsuite.store.kinds import LEASE, Index, KindSpec, Lease, format_key, secret

__all__ = [
    "AddressPool", "Change", "Conflict", "Exhausted", "IStoreBackend", "Index", "KindSpec",
    "LEASE", "Lease", "MemoryBackend", "Row", "SqliteBackend", "Store", "StoreBackendError",
    "UnknownKind", "format_key", "secret", "make_store",
]


def make_store(config, clock=None) -> Store:  # type: ignore[no-untyped-def]
    """Build the store the config describes (backend, pools); not yet opened."""
    if config.store.backend == "sqlite":
        backend = SqliteBackend(config.store_path, config.store.flush_interval,
                                config.store.synchronous)
    else:
        backend = MemoryBackend()
    store = Store(backend, clock)
    for name, pool in config.store.pools.items():
        store.add_pool(name, pool.network, pool.exclude)
    return store
