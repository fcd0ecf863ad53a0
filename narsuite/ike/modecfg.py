"""Remote access over IKEv1: XAUTH and mode-config in transaction exchanges (type 6).

After phase 1 a road-warrior client (strongSwan with ``xauth-generic``, Cisco/iOS/Android
clients) needs two more things before Quick Mode: the user behind the device proves a
password (XAUTH, draft-beaulieu-ike-xauth-02), and the device learns its inner address, DNS
servers and the protected networks (mode-config, draft-ietf-ipsec-isakmp-mode-cfg-05).  Both
are carried in Attribute payloads (``isakmp.AttributePayload``) inside HASH-protected
transaction exchanges.

Why this module knows nothing of encryption, HASHes or message IDs: those are the engine's
(``narsuite.ike.engine``), shared with Quick Mode and informational exchanges.  Here is only
the conversation, as a small state machine over decoded payloads, so it can be tested with
plain records and fake Deferreds.  One :class:`TransactionServer` per IKE SA.

The engine's side of the contract:

* ``start()`` after phase 1, and ``received(payload)`` for every Attribute payload that
  arrives in a transaction exchange (after the engine has checked its HASH and dropped
  retransmissions).  Both return a Deferred list of payloads to send; the Deferred never
  fails (password checker and store errors become a FAIL or a failed state, logged here).
* each payload returned goes in its own transaction message.  :func:`is_response` says which
  message ID: a CFG_REPLY/CFG_ACK answers the message just received (same message ID); a
  CFG_REQUEST/CFG_SET opens a new transaction (fresh message ID, retransmitted by the engine
  until the peer answers).
* a payload the server cannot take (out of order, unknown type) raises
  :class:`TransactionError` synchronously, before any state changes: the engine logs and
  drops it.  One arriving while a password check or a lease is in flight is queued and
  processed after it (its Deferred fires later; if it then does not fit, with ``[]``).
* :attr:`TransactionServer.state`: ``"xauth"`` (XAUTH under way), ``"config"`` (XAUTH
  passed or not required: Quick Mode may start; a pull client may still ask for its
  config), ``"done"`` (config handed out), ``"failed"`` (delete the IKE SA once the payloads
  returned with the failure -- a FAIL status, a reply without address -- have been sent or
  answered; :attr:`~TransactionServer.failure_reason` says why).  ``address`` is the leased
  inner address for the esp role's peer record; ``user`` the XAUTH user name.

Interop choices (see docs/ike-remote-access.md):

* the XAUTH request carries XAUTH-TYPE generic (0), XAUTH-USER-NAME and XAUTH-USER-PASSWORD
  with empty values, as Cisco gateways do; strongSwan ignores the type;
* identifiers: ours are a random 16-bit start, +1 per transaction we open; a reply or ack
  may carry 0 instead (strongSwan does in the XAUTH reply and the mode-config ack), so a
  mismatch is logged, never refused -- the HASH already binds the message to its exchange;
* a trailing NUL on the user name or password is dropped (Android sends C strings);
* a bad password is answered with a new request (with an XAUTH-MESSAGE) ``xauth_retries``
  times, then with XAUTH-STATUS FAIL.  A wrong user and a wrong password look alike, on the
  wire and in the timing (the checker pays a dummy hash for unknown users);
* a pushed CFG_SET is answered by CFG_ACK, or by CFG_REPLY from a strongSwan client configured
  to pull (it replies to any SET unless ``pull = no``): both end our transaction;
* mode-config answers every client request, also when we push and also after ``done`` (a
  client may ask again; the store gives back the same lease per owner).  A request that
  arrives while our XAUTH OK status waits for its ack is served (UDP may reorder the ack and
  the request that follows it).
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer

from narsuite import __version__
from narsuite.ike import constants as C
from narsuite.ike.isakmp import Attribute, AttributePayload
from narsuite.logs import logger

if TYPE_CHECKING:
    from narsuite.store import Store

__all__ = [
    "RemoteAccessPolicy", "TransactionServer", "TransactionError", "is_response",
    "XAUTH", "CONFIG", "DONE", "FAILED", "CFG_NAMES", "split_include_networks",
]

log = logger()

XAUTH = "xauth"
CONFIG = "config"
DONE = "done"
FAILED = "failed"

CFG_NAMES = {C.CFG_REQUEST: "CFG_REQUEST", C.CFG_REPLY: "CFG_REPLY", C.CFG_SET: "CFG_SET",
             C.CFG_ACK: "CFG_ACK"}

#: What a client may ask for that we can answer (SUPPORTED_ATTRIBUTES lists these).
_SUPPORTED = (C.INTERNAL_IP4_ADDRESS, C.INTERNAL_IP4_NETMASK, C.INTERNAL_IP4_DNS,
              C.INTERNAL_IP4_NBNS, C.INTERNAL_IP4_SUBNET, C.SUPPORTED_ATTRIBUTES,
              C.APPLICATION_VERSION, C.UNITY_SPLIT_INCLUDE)

_RETRY_MESSAGE = b"Authentication failed; please try again."


class TransactionError(ValueError):
    """A payload the transaction server cannot accept in its current state.

    Raised synchronously by :meth:`TransactionServer.received` before anything changes, so
    the engine can drop the message (it was authenticated, so it is a confused or hostile
    peer, not line noise) without the server's state having moved.
    """

    def __init__(self, detail: str, payload: AttributePayload | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.payload = payload


def is_response(payload: AttributePayload) -> bool:
    """True if ``payload`` answers the message just received (CFG_REPLY, CFG_ACK): send it
    with that message's ID.  False for CFG_REQUEST/CFG_SET: a new transaction, a new ID."""
    return payload.cfg_type in (C.CFG_REPLY, C.CFG_ACK)


def _networks(values: Iterable[str]) -> tuple[str, ...]:
    out = tuple(values)
    for v in out:
        IPv4Network(v, strict=False)
    return out


def _addresses(values: Iterable[str]) -> tuple[str, ...]:
    out = tuple(values)
    for v in out:
        IPv4Address(v)
    return out


def _optional_mask(value: str | None) -> str | None:
    if value is not None:
        # "255.255.255.0" or "/24" or "24": normalise to dotted form.
        text = value.lstrip("/")
        value = str(IPv4Network(f"0.0.0.0/{text}").netmask)
    return value


@attrs.frozen
class RemoteAccessPolicy:
    """What one peer policy gives a remote-access client.  Built by the engine from its
    ``[[ike.peers]]`` entry; validated here so a typo fails at start, not at the first login.

    ``pool`` empty: no inner address is handed out (DNS and subnets still are).
    ``netmask`` None: the pool's prefix (given to the server as ``pool_network``), else none
    is sent.  ``split_include``: the protected networks, sent as INTERNAL_IP4_SUBNET and, to
    Cisco Unity clients, as UNITY_SPLIT_INCLUDE.  ``push``: send CFG_SET ourselves instead of
    waiting for the client's CFG_REQUEST.  ``xauth_retries``: new prompts after a bad
    password before XAUTH-STATUS FAIL.
    """

    xauth: bool = False
    pool: str = ""
    dns: tuple[str, ...] = attrs.field(default=(), converter=_addresses)
    nbns: tuple[str, ...] = attrs.field(default=(), converter=_addresses)
    netmask: str | None = attrs.field(default=None, converter=_optional_mask)
    split_include: tuple[str, ...] = attrs.field(default=(), converter=_networks)
    push: bool = False
    xauth_retries: int = attrs.field(default=2, validator=attrs.validators.in_(range(0, 11)))


Lease = Callable[[IPv4Address | None], "defer.Deferred[IPv4Address]"]
CheckPassword = Callable[[str, bytes], "defer.Deferred[bool]"]


def _cstring(value: bytes) -> bytes:
    return value[:-1] if value.endswith(b"\0") else value


def _mask_bytes(network: IPv4Network) -> bytes:
    return network.network_address.packed + network.netmask.packed


class TransactionServer:
    """One per IKE SA: drives XAUTH (if the policy requires it), then mode-config.

    ``lease(prefer)`` returns a Deferred IPv4Address from the policy's pool for this IKE SA
    (the same one when asked again), ``prefer`` being the client's requested address or
    None; failing with ``narsuite.store.Exhausted`` (or anything) means no address.
    ``check_password(user, password)`` returns a Deferred bool (a
    :class:`narsuite.passwords.PasswordChecker` adapted with ``checker.check(user.encode(),
    password)``).  ``peer_name`` goes into the logs.  ``unity``: the peer sent the Cisco
    Unity vendor ID, so pushed configs carry UNITY_SPLIT_INCLUDE.  ``count(name)`` is
    called for each event worth a counter: ``xauth_ok``, ``xauth_bad_password``,
    ``xauth_failed``, ``modecfg_address``, ``modecfg_no_address``.
    """

    def __init__(self, policy: RemoteAccessPolicy, *, lease: Lease, check_password: CheckPassword,
                 peer_name: str, pool_network: IPv4Network | None = None, unity: bool = False,
                 count: Callable[[str], None] | None = None) -> None:
        self.policy = policy
        self._lease = lease
        self._check = check_password
        self.peer_name = peer_name
        self.unity = unity
        self._count = count or (lambda name: None)
        if policy.netmask is not None:
            self.netmask: IPv4Address | None = IPv4Address(policy.netmask)
        elif pool_network is not None:
            self.netmask = pool_network.netmask
        else:
            self.netmask = None
        self._dns = [IPv4Address(a) for a in policy.dns]
        self._nbns = [IPv4Address(a) for a in policy.nbns]
        self._subnets = [IPv4Network(n, strict=False) for n in policy.split_include]

        self.state = XAUTH if policy.xauth else CONFIG
        self.address: IPv4Address | None = None
        self.user: str | None = None
        self.failure_reason: str | None = None
        #: bad passwords (or unusable replies) so far in this IKE SA
        self.xauth_failures = 0
        self._started = False
        self._busy = False
        self._queue: list[tuple[AttributePayload, defer.Deferred[list[AttributePayload]]]] = []
        self._next_id = secrets.randbelow(0xFFFF) + 1
        #: (cfg_type we wait for, identifier of our payload it answers), or None
        self._awaiting: tuple[int, int] | None = None
        self._xauth_ok_sent = False  # SET OK sent, its ACK not yet seen

    # -- construction helpers ----------------------------------------------------------------

    @classmethod
    def for_store(cls, policy: RemoteAccessPolicy, store: Store, owner: str, *,
                  check_password: CheckPassword, peer_name: str, ttl: float | None = None,
                  unity: bool = False, count: Callable[[str], None] | None = None) -> TransactionServer:
        """A server leasing from ``store``'s pool ``policy.pool`` as ``owner`` (one owner per
        IKE SA: ``store.drop_owner(owner)`` at SA deletion gives the address back)."""
        pool = store.pools().get(policy.pool) if policy.pool else None
        if policy.pool and pool is None:
            raise ValueError(f"no address pool named {policy.pool!r}")

        def lease(prefer: IPv4Address | None) -> defer.Deferred[IPv4Address]:
            return store.lease_address(policy.pool, owner, ttl=ttl, prefer=prefer)

        return cls(policy, lease=lease, check_password=check_password, peer_name=peer_name,
                   pool_network=pool.network if pool is not None else None, unity=unity, count=count)

    # -- public API --------------------------------------------------------------------------

    @property
    def xauth_passed(self) -> bool:
        """XAUTH succeeded, or was not required: Quick Mode may start."""
        return self.state in (CONFIG, DONE)

    def start(self) -> defer.Deferred[list[AttributePayload]]:
        """What to send right after phase 1: the XAUTH request, a pushed config, or nothing."""
        if self._started:
            raise TransactionError("start() called twice")
        self._started = True
        if self.state == XAUTH:
            return defer.succeed([self._xauth_request(retry=False)])
        if self.policy.push:
            return self._busy_until(self._push())
        return defer.succeed([])

    def received(self, payload: AttributePayload) -> defer.Deferred[list[AttributePayload]]:
        """Process one Attribute payload from the peer; a Deferred list of payloads to send.

        Raises :class:`TransactionError` (state unchanged) for a payload that does not fit.
        A payload arriving while an earlier one (or the pushed config) still waits for the
        password checker or the store is queued and processed after it, in arrival order:
        clients send their mode-config request right behind their XAUTH ack, before a
        durable store has confirmed the pushed lease.  A queued payload that turns out not
        to fit is logged and answered with an empty list (it can no longer raise).
        """
        if not isinstance(payload, AttributePayload):
            raise TransactionError(f"not an Attribute payload: {type(payload).__name__}")
        name = CFG_NAMES.get(payload.cfg_type)
        if name is None:
            raise TransactionError(f"unknown configuration message type {payload.cfg_type}", payload)
        if not self._started:
            raise TransactionError(f"{name} before the transaction server started", payload)
        if self._busy:
            log.debug("ike {peer}: {name} queued behind the message in progress", peer=self.peer_name, name=name)
            queued: defer.Deferred[list[AttributePayload]] = defer.Deferred()
            self._queue.append((payload, queued))
            return queued
        return self._dispatch(payload, name)

    def _dispatch(self, payload: AttributePayload, name: str) -> defer.Deferred[list[AttributePayload]]:
        t = payload.cfg_type
        if self.state == XAUTH:
            if t == C.CFG_REPLY and self._awaits(C.CFG_REPLY, payload):
                return self._busy_until(self._xauth_reply(payload))
            if t == C.CFG_ACK and self._awaits(C.CFG_ACK, payload):
                return self._busy_until(self._xauth_acked())
            if t == C.CFG_REQUEST and self._xauth_ok_sent:
                # The client's mode-config request overtook its ack of our XAUTH OK.
                self._xauth_done()
                return self._busy_until(self._reply(payload))
        elif self.state in (CONFIG, DONE):
            if t == C.CFG_REQUEST:
                return self._busy_until(self._reply(payload))
            if t == C.CFG_ACK and self._xauth_ok_sent:
                self._xauth_ok_sent = False  # the late ack of XAUTH OK
                self._awaiting = None
                return defer.succeed([])
            if t in (C.CFG_ACK, C.CFG_REPLY) and self._awaits(C.CFG_ACK, payload):
                # A strongSwan client set to pull answers a pushed SET with a REPLY (and then
                # sends its own REQUEST, served above): it still answers our transaction.
                self._awaiting = None
                self.state = DONE
                log.info("ike {peer}: pushed configuration acknowledged ({name})", peer=self.peer_name, name=name)
                return defer.succeed([])
        elif self.state == FAILED:
            if t == C.CFG_ACK and self._awaits(C.CFG_ACK, payload):
                self._awaiting = None  # the ack of our XAUTH FAIL
                return defer.succeed([])
        raise TransactionError(f"{name} not expected in state {self.state}"
                               + (f" (waiting for {CFG_NAMES[self._awaiting[0]]})" if self._awaiting else ""),
                               payload)

    # -- plumbing ----------------------------------------------------------------------------

    def _new_id(self) -> int:
        ident = self._next_id
        self._next_id = self._next_id % 0xFFFF + 1  # 1..65535, never 0 (what lazy peers echo)
        return ident

    def _awaits(self, cfg_type: int, payload: AttributePayload) -> bool:
        if self._awaiting is None or self._awaiting[0] != cfg_type:
            return False
        if payload.identifier not in (self._awaiting[1], 0):
            log.debug("ike {peer}: {name} identifier {got} for our {want}; accepted",
                      peer=self.peer_name, name=CFG_NAMES[cfg_type], got=payload.identifier,
                      want=self._awaiting[1])
        return True

    def _busy_until(self, d: defer.Deferred[list[AttributePayload]]) -> defer.Deferred[list[AttributePayload]]:
        """Hold incoming payloads in the queue until ``d`` fires; the caller's callbacks (the
        engine sending our answer) run before the next queued payload is processed, so what
        we send stays in the order the peer's messages came."""
        self._busy = True
        outer: defer.Deferred[list[AttributePayload]] = defer.Deferred()

        def finish(result: list[AttributePayload]) -> None:
            self._busy = False
            outer.callback(result)
            self._drain()

        def failed(f: Any) -> None:  # a bug here, not the peer's doing
            log.failure("ike {peer}: transaction processing failed", f, peer=self.peer_name)
            self._fail("internal error")
            finish([])

        d.addCallbacks(finish, failed)
        return outer

    def _drain(self) -> None:
        while self._queue and not self._busy:
            payload, queued = self._queue.pop(0)
            name = CFG_NAMES[payload.cfg_type]
            try:
                d = self._dispatch(payload, name)
            except TransactionError as e:
                log.warn("ike {peer}: queued {name} dropped: {why}", peer=self.peer_name, name=name, why=e.detail)
                queued.callback([])
                continue
            d.chainDeferred(queued)

    def _fail(self, reason: str) -> None:
        self.state = FAILED
        if self.failure_reason is None:
            self.failure_reason = reason

    # -- XAUTH -------------------------------------------------------------------------------

    def _xauth_request(self, *, retry: bool) -> AttributePayload:
        ident = self._new_id()
        self._awaiting = (C.CFG_REPLY, ident)
        attributes = [Attribute(C.XAUTH_TYPE, C.XAUTH_TYPE_GENERIC),
                      Attribute(C.XAUTH_USER_NAME, b""), Attribute(C.XAUTH_USER_PASSWORD, b"")]
        if retry:
            attributes.append(Attribute(C.XAUTH_MESSAGE, _RETRY_MESSAGE))
        return AttributePayload(C.CFG_REQUEST, ident, attributes)

    def _status(self, ok: bool) -> AttributePayload:
        ident = self._new_id()
        self._awaiting = (C.CFG_ACK, ident)
        status = C.XAUTH_STATUS_OK if ok else C.XAUTH_STATUS_FAIL
        return AttributePayload(C.CFG_SET, ident, [Attribute(C.XAUTH_STATUS, status)])

    def _xauth_reply(self, payload: AttributePayload) -> defer.Deferred[list[AttributePayload]]:
        self._awaiting = None
        status = payload.get(C.XAUTH_STATUS)
        if status is not None and (status.is_tv or status.value) and status.int_value == C.XAUTH_STATUS_FAIL:
            # The draft lets the client give up (a user pressing Cancel).
            log.info("ike {peer}: XAUTH cancelled by the client", peer=self.peer_name)
            self._count("xauth_failed")
            self._fail("XAUTH cancelled by the client")
            return defer.succeed([self._status(False)])
        name = payload.get(C.XAUTH_USER_NAME)
        password = payload.get(C.XAUTH_USER_PASSWORD)
        if name is None or password is None or name.is_tv or password.is_tv:
            return defer.succeed(self._bad_attempt(None, "reply without a user name and password"))
        try:
            user = _cstring(bytes(name.value)).decode("utf-8")
        except UnicodeDecodeError:
            return defer.succeed(self._bad_attempt(None, "user name is not UTF-8"))
        secret = _cstring(bytes(password.value))
        if not user or not secret:
            return defer.succeed(self._bad_attempt(user or None, "empty user name or password"))
        d = defer.maybeDeferred(self._check, user, secret)

        def checked(ok: object) -> list[AttributePayload]:
            if ok is True:
                self.user = user
                self._xauth_ok_sent = True
                self._count("xauth_ok")
                log.info("ike {peer}: XAUTH user {user!r} authenticated", peer=self.peer_name, user=user)
                return [self._status(True)]
            return self._bad_attempt(user, "bad user name or password")

        def check_failed(f: Any) -> list[AttributePayload]:
            log.failure("ike {peer}: password check raised", f, peer=self.peer_name)
            return self._bad_attempt(user, "password check failed")

        return d.addCallbacks(checked, check_failed)

    def _bad_attempt(self, user: str | None, why: str) -> list[AttributePayload]:
        self.xauth_failures += 1
        self._count("xauth_bad_password")
        allowed = 1 + self.policy.xauth_retries
        log.warn("ike {peer}: XAUTH attempt {n}/{allowed} failed for user {user!r}: {why}",
                 peer=self.peer_name, n=self.xauth_failures, allowed=allowed, user=user, why=why)
        if self.xauth_failures < allowed:
            return [self._xauth_request(retry=True)]
        self._count("xauth_failed")
        self._fail(f"XAUTH failed {self.xauth_failures} times (last user {user!r}: {why})")
        return [self._status(False)]

    def _xauth_acked(self) -> defer.Deferred[list[AttributePayload]]:
        self._awaiting = None
        self._xauth_done()
        self._xauth_ok_sent = False
        if self.policy.push:
            return self._push()
        return defer.succeed([])

    def _xauth_done(self) -> None:
        if self.state == XAUTH:
            self.state = CONFIG

    # -- mode-config -------------------------------------------------------------------------

    def _get_address(self, prefer: IPv4Address | None) -> defer.Deferred[IPv4Address | None]:
        """The lease, or None (logged, counted) when the pool cannot give one."""
        d = defer.maybeDeferred(self._lease, prefer)

        def got(addr: IPv4Address) -> IPv4Address:
            addr = IPv4Address(addr)
            if addr != self.address:
                log.info("ike {peer}: assigned inner address {addr} from pool {pool}",
                         peer=self.peer_name, addr=addr, pool=self.policy.pool)
            self.address = addr
            self._count("modecfg_address")
            return addr

        def none(f: Any) -> None:
            self._count("modecfg_no_address")
            reason = f"no address from pool {self.policy.pool!r}: {f.getErrorMessage()}"
            log.error("ike {peer}: {reason}", peer=self.peer_name, reason=reason)
            self._fail(reason)
            return None

        return d.addCallbacks(got, none)

    def _config_attributes(self, address: IPv4Address | None, wanted: set[int] | None) -> list[Attribute]:
        """The config we hand out; ``wanted`` is the set of requested types (None when
        pushing).  Standard attributes go out whether asked for or not (the draft lets the
        responder add what it has); the Cisco ones only when asked for, or pushed to a Unity
        peer."""
        out: list[Attribute] = []
        if address is not None:
            out.append(Attribute(C.INTERNAL_IP4_ADDRESS, address.packed))
            if self.netmask is not None:
                out.append(Attribute(C.INTERNAL_IP4_NETMASK, self.netmask.packed))
        out += [Attribute(C.INTERNAL_IP4_DNS, a.packed) for a in self._dns]
        out += [Attribute(C.INTERNAL_IP4_NBNS, a.packed) for a in self._nbns]
        out += [Attribute(C.INTERNAL_IP4_SUBNET, _mask_bytes(n)) for n in self._subnets]
        unity = self.unity if wanted is None else C.UNITY_SPLIT_INCLUDE in wanted
        split = [n for n in self._subnets if n.prefixlen > 0]
        if unity and split:
            # Cisco's layout: address, mask, then protocol (1), source port (2) and
            # destination port (2) plus a pad byte, which every client ignores: 14 bytes each.
            out.append(Attribute(C.UNITY_SPLIT_INCLUDE, b"".join(_mask_bytes(n) + bytes(6) for n in split)))
        if wanted is not None:
            if C.APPLICATION_VERSION in wanted:
                out.append(Attribute(C.APPLICATION_VERSION, f"narsuite {__version__}".encode()))
            if C.SUPPORTED_ATTRIBUTES in wanted:
                out.append(Attribute(C.SUPPORTED_ATTRIBUTES,
                                     b"".join(t.to_bytes(2, "big") for t in _SUPPORTED)))
        return out

    def _reply(self, request: AttributePayload) -> defer.Deferred[list[AttributePayload]]:
        wanted = {a.type for a in request.attributes}
        prefer = None
        asked = request.get(C.INTERNAL_IP4_ADDRESS)
        if asked is not None and isinstance(asked.value, bytes) and len(asked.value) == 4:  # TLV form
            candidate = IPv4Address(bytes(asked.value))
            if not candidate.is_unspecified:
                prefer = candidate
        ignored = sorted(wanted - set(_SUPPORTED))
        if ignored:
            log.debug("ike {peer}: not answering requested attributes {types}", peer=self.peer_name,
                      types=ignored)

        def build(address: IPv4Address | None) -> list[AttributePayload]:
            if self.state != FAILED:
                self.state = DONE
            return [AttributePayload(C.CFG_REPLY, request.identifier, self._config_attributes(address, wanted))]

        if C.INTERNAL_IP4_ADDRESS in wanted and self.policy.pool:
            return self._get_address(prefer).addCallback(build)
        return defer.succeed(build(self.address))

    def _push(self) -> defer.Deferred[list[AttributePayload]]:
        def build(address: IPv4Address | None) -> list[AttributePayload]:
            if self.policy.pool and address is None:
                return []  # failed, nothing worth pushing
            ident = self._new_id()
            self._awaiting = (C.CFG_ACK, ident)
            return [AttributePayload(C.CFG_SET, ident, self._config_attributes(address, None))]

        if self.policy.pool:
            return self._get_address(None).addCallback(build)
        return defer.succeed(build(None))


def split_include_networks(value: bytes) -> list[IPv4Network]:
    """Decode a UNITY_SPLIT_INCLUDE value (14-byte entries); for tests and logs."""
    if len(value) % 14:
        raise ValueError(f"UNITY_SPLIT_INCLUDE of {len(value)} bytes is not a multiple of 14")
    out = []
    for i in range(0, len(value), 14):
        addr, mask = IPv4Address(value[i:i + 4]), IPv4Address(value[i + 4:i + 8])
        out.append(ipaddress.IPv4Network(f"{addr}/{mask}"))
    return out
