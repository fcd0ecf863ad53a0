"""Transaction exchanges: XAUTH and mode-config (draft-beaulieu-ike-xauth,
draft-ietf-ipsec-isakmp-mode-cfg).  The attribute dialogue itself is
:class:`narsuite.ike.modecfg.TransactionServer`; this part carries it over the
ISAKMP SA and applies its outcome (the XAUTH user, the leased address)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from narsuite.ike import constants as C
from narsuite.ike import crypto, isakmp, modecfg
from narsuite.ike.common import Drop
from narsuite.ike.config import PeerPolicy
from narsuite.ike.isakmp import AttributePayload, ISAKMPError
from narsuite.ike.sa import IkeSA
from narsuite.logs import logger

if TYPE_CHECKING:
    from narsuite.ike.engine import IkeEngine

__all__ = ["Transactions"]

log = logger()


class Transactions:
    """XAUTH and mode-config for one engine (the engine is this part's transport)."""

    def __init__(self, engine: IkeEngine) -> None:
        self.engine = engine

    @staticmethod
    def wanted(policy: PeerPolicy) -> bool:
        """Does the policy hand out anything by mode-config?  An address (pool), or only
        internal DNS and protected subnets (001 §5 stands on its own)."""
        return bool(policy.pool or policy.dns or policy.split_include or policy.modecfg_push)

    def lease_owner(self, sa: IkeSA) -> str:
        """Who holds a mode-config address: the XAUTH user (so a re-authenticating
        client gets its address back), else the identity at its NAT mapping."""
        assert sa.policy is not None
        t = sa.transaction
        # (an SA resumed on a standby has no transaction left: its user is the SA's)
        user = (t.user if t is not None and t.user else "") or sa.xauth_user
        if user:
            return f"ike:lease:{sa.policy.name}:user:{user}"
        return f"ike:lease:{sa.policy.name}:{sa.peer_id_text}@{sa.remote[0]}:{sa.remote[1]}"

    def start(self, sa: IkeSA) -> None:
        """Phase 1 is done and the policy wants XAUTH or mode-config: set up the dialogue
        and send what we start with (XAUTH request, or a pushed CFG_SET)."""
        e = self.engine
        assert sa.policy is not None and sa.choice is not None
        p = sa.policy
        policy = modecfg.RemoteAccessPolicy(
            xauth=sa.choice.xauth, pool=p.pool, dns=tuple(p.dns), split_include=tuple(p.split_include),
            push=p.modecfg_push, xauth_retries=e.cfg.xauth_retries)

        def lease(prefer: Any = None) -> defer.Deferred:
            return e.store.lease_address(p.pool, self.lease_owner(sa), prefer=prefer)

        def check(user: str, password: bytes) -> defer.Deferred:
            if e.check_password is None:
                return defer.succeed(False)
            return e.check_password(user, password)

        pool = e.store.pools().get(p.pool) if p.pool else None
        sa.transaction = modecfg.TransactionServer(
            policy, lease=lease, check_password=check, peer_name=sa.name,
            pool_network=pool.network if pool is not None else None, unity=sa.peer_unity, count=e.count)

        def first(out: list[AttributePayload]) -> None:
            for payload in out:
                e.send_request(sa, C.EXCH_TRANSACTION, [payload], kind="transaction")
            if sa.transaction.state == "failed":  # e.g. a pushed config and an empty pool
                log.warn("ike: {name}: remote access refused: {why}", name=sa.name,
                         why=sa.transaction.failure_reason)
                e.schedule_delete(sa, "remote access refused")

        sa.transaction.start().addCallbacks(first, self._failed, errbackArgs=(sa,))

    def received(self, sa: IkeSA, header: isakmp.Header, data: bytes, addr: tuple[str, int], local_port: int,
                 digest: bytes) -> None:
        e = self.engine
        assert sa.keys is not None and sa.choice is not None
        h, a, mid = sa.choice.hash, sa.keys.skeyid_a, header.message_id
        if sa.transaction is None:
            raise Drop("unexpected", "transaction exchange without XAUTH or mode-config configured")
        _ct, payloads = e.open_protected(sa, header, data, lambda rest: crypto.transaction_hash(h, a, mid, rest))
        sa.last_rx = e.now()
        e.follow(sa, addr, local_port)
        attr = isakmp.find(payloads, AttributePayload)
        if attr is None:
            raise ISAKMPError(C.PAYLOAD_MALFORMED, "transaction without an attribute payload")
        answered = sa.pending.pop(mid, None)
        if answered is not None and answered.timer is not None and answered.timer.active():
            answered.timer.cancel()
        if answered is None:
            sa.used_mids.add(mid)
        try:
            d = sa.transaction.received(attr)
        except modecfg.TransactionError as err:
            raise Drop("unexpected", f"transaction: {err}") from None
        e.remember(sa, digest)  # processed: a retransmission of it is a duplicate
        d.addCallback(self._out, sa, mid, digest, answered is None)
        d.addErrback(self._failed, sa)

    def _out(self, out: list[AttributePayload], sa: IkeSA, mid: int, digest: bytes, peer_request: bool) -> None:
        e = self.engine
        if sa.state != "established":
            return
        assert sa.keys is not None and sa.choice is not None and sa.crypto is not None
        h, a = sa.choice.hash, sa.keys.skeyid_a
        for payload in out:
            if payload.cfg_type in (C.CFG_REPLY, C.CFG_ACK) and peer_request:
                reply = e.seal(sa, C.EXCH_TRANSACTION, mid, [payload],
                               lambda rest: crypto.transaction_hash(h, a, mid, rest))
                e.reply(sa, digest, [reply])
            else:
                e.send_request(sa, C.EXCH_TRANSACTION, [payload], kind="transaction")
        if not peer_request:
            sa.crypto.ivs.forget(mid)
        t = sa.transaction
        if t.user and not sa.xauth_user:
            sa.xauth_user = t.user
        if t.state == "failed":
            log.warn("ike: {name}: remote access refused: {why}", name=sa.name, why=t.failure_reason)
            e.schedule_delete(sa, "remote access refused")
        elif t.address is not None and not sa.address:
            sa.address = str(t.address)
            e.count("modecfg_done")
            log.info("ike: {name}: mode-config address {addr} for {who}", name=sa.name, addr=sa.address,
                     who=sa.xauth_user or sa.peer_id_text)
        if t.state in ("config", "done") and sa.choice.xauth and not sa.xauth_done:
            sa.xauth_done = True
            log.info("ike: {name}: XAUTH user {user} authenticated", name=sa.name, user=sa.xauth_user)
            if sa.initial_contact:
                e.informational.initial_contact(sa)
            e.children.adopt_orphans(sa)
        e.publish(sa)

    def _failed(self, f: Any, sa: IkeSA) -> None:
        self.engine.count("internal_error")
        log.failure("ike: {name}: transaction exchange", f, name=sa.name)
        self.engine.delete_ike(sa, notify_peer=True, reason="transaction error")
