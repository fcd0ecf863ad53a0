"""The common mapping store (see :mod:`narsuite.store.core`)."""

from narsuite.store.backends import IStoreBackend, MemoryBackend, Row, SqliteBackend, StoreBackendError
from narsuite.store.core import AddressPool, Change, Conflict, Exhausted, Store, UnknownKind
from narsuite.store.kinds import LEASE, Index, KindSpec, Lease, format_key, secret

__all__ = [
    "AddressPool", "Change", "Conflict", "Exhausted", "IStoreBackend", "Index", "KindSpec",
    "LEASE", "Lease", "MemoryBackend", "Row", "SqliteBackend", "Store", "StoreBackendError",
    "UnknownKind", "format_key", "secret", "make_store",
]


def make_store(config, clock=None) -> Store:
    """Build the store the config describes (backend, pools); not yet opened."""
    backend: IStoreBackend
    if config.store.backend == "sqlite":
        backend = SqliteBackend(config.store_path, config.store.flush_interval,
                                config.store.synchronous)
    elif config.store.backend == "redis":
        from narsuite.store.redis import RedisBackend, describe, make_redis_client

        rc, cc = config.store.redis, config.cluster
        backend = RedisBackend(make_redis_client(rc), cc.node_id, prefix=rc.prefix,
                               replicas_ack=rc.replicas_ack, ack_timeout=rc.ack_timeout,
                               stream_maxlen=rc.stream_maxlen, heartbeat_interval=cc.heartbeat_interval,
                               heartbeat_timeout=cc.heartbeat_timeout, where=describe(rc),
                               io_timeout=rc.connect_timeout + 1.0)
    else:
        backend = MemoryBackend()
    store = Store(backend, clock, node_id=config.cluster.node_id or None)
    for name, pool in config.store.pools.items():
        store.add_pool(name, pool.network, pool.exclude)
    return store
