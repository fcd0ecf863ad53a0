"""Where the IKE responder's CPU goes: cProfile of :class:`IkeEngine`, in-process, no network.

Run:
    python bench/profile_ike.py [--group 19] [-n 1000] [--concurrency 32] [--store sqlite|memory]
                                [--log info|warn] [--no-esp] [--top 30] [--dump prof.out]

What runs: the engine of ``twistd -n narsuite --role=ike,esp`` with the config
``bench/bench_ike.py`` gives the daemon (:data:`bench_ike.NARSUITE_CONF`, parsed by the real
config loader), its store (SQLite or memory backend), the ESP engine subscribed to that store
(as the esp role is), and Twisted logging to a text observer writing to /dev/null (the
formatting cost of twistd's log file, without the disk).  ``tests/ike_peer.py`` initiators
(``force_nat``: they float to 4500 like the bench's) talk to it through a FIFO of datagrams:
``--concurrency`` exchanges in flight, ``-n`` in all, each asking for its own /32.

The profiler is on only while the responder works: ``engine.received`` (what the service's
UDP handlers call, marker already stripped) and the store's group commit.  The SQLite backend
is driven as the daemon drives it -- writes queue, one transaction every ``flush_interval``
(here: of wall time, or when every exchange in flight waits for it) -- but the commit runs in
this thread, where the daemon runs it in a worker thread (same CPU, other core; the Quick
Mode answer waits for the SPI lease to be durable either way).  Initiator work is not profiled.

Output, per completed MM+QM: responder CPU by message (MM1, MM3, MM5, QM1, QM3, commits),
exclusive time by category (Diffie-Hellman, hashing/PRF, AES, codec, store, logging, ...;
C functions are charged to the category of their caller unless they are crypto or SQLite),
the top functions by cumulative and by own time, and the floor: what the Diffie-Hellman
operations alone cost through ``cryptography``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import ike_peer as P  # noqa: E402
from twisted.logger import globalLogBeginner  # noqa: E402

from narsuite import logs  # noqa: E402
from narsuite.config import loads  # noqa: E402
from narsuite.ike import crypto  # noqa: E402
from narsuite.ike.engine import IkeEngine  # noqa: E402
from narsuite.store import Store  # noqa: E402
from narsuite.store.backends import MemoryBackend, SqliteBackend  # noqa: E402

RESPONDER = "198.51.100.1"
STEPS = ("MM1", "MM3", "MM5", "QM1", "QM3")


class _NotStarted:
    """Stands in for the backend's thread pool: writes queue until we commit them."""


def build(args: argparse.Namespace, workdir: Path, conf: str | None = None):  # type: ignore[no-untyped-def]
    """The daemon's engine parts for ``conf`` (default: bench_ike's config, verbatim)."""
    if conf is None:
        from bench_ike import NARSUITE_CONF as conf

    from narsuite.esp.engine import EspEngine
    from narsuite.esp.role import ROLE as ESP_ROLE
    from narsuite.ike.role import ROLE as IKE_ROLE

    text = conf.format(workdir=workdir, store=args.store, log=args.log, psk=args.psk,
                       client_net=args.client_net, store_extra="")
    cfg = loads(text, base=workdir)
    ike_cfg = cfg.roles["ike"]
    # the real reactor as the clock (never run): a heap of timers, as in the daemon --
    # task.Clock re-sorts all its calls on every callLater, which would dominate the profile
    from twisted.internet import reactor as clock
    if args.store == "sqlite":
        backend = SqliteBackend(workdir / "store.sqlite", cfg.store.flush_interval, cfg.store.synchronous)
        backend._pool = _NotStarted()  # queue writes; commit() below does the group commit
    else:
        backend = MemoryBackend()
    store = Store(backend, clock)
    for spec in (*IKE_ROLE.kinds, *(ESP_ROLE.kinds if not args.no_esp else ())):
        store.register(spec)
    store.open()
    esp = None if args.no_esp else EspEngine(store, clock)
    return ike_cfg, clock, store, backend, esp, cfg.store.flush_interval


def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="profile_ike_"))
    # twistd's log file observer, writing to /dev/null: the formatting is the cost
    devnull = open(os.devnull, "w")
    globalLogBeginner.beginLoggingTo([logs.text_observer(devnull)], redirectStandardIO=False,
                                     discardBuffer=True)
    logs.set_level(args.log)
    ike_cfg, clock, store, backend, esp, flush_interval = build(args, workdir)

    queue: deque = deque()  # ("r", addr, data, port) to the responder, ("i", ex, data, port) to an initiator
    by_addr: dict[tuple[str, int], list] = {}

    def send(data: bytes, addr: tuple[str, int], local_port: int) -> None:
        if local_port == ike_cfg.natt_port:
            data = P.NON_ESP_MARKER + data
        queue.append(("i", by_addr[addr], data, local_port))

    engine = IkeEngine(ike_cfg, store, clock, send=send, local_address=lambda ip: RESPONDER)

    phase1 = P.Phase1(cipher="aes-cbc", key_bits=128, hash="sha1", group=args.group)
    base_inner = int.from_bytes(bytes([10, 128, 0, 0]), "big")
    prof = cProfile.Profile()
    if args.no_profile:  # timings only: what the responder costs without cProfile's overhead
        prof.enable = prof.disable = lambda: None  # type: ignore[method-assign]
    step_time: dict[str, float] = defaultdict(float)
    commit_time = 0.0
    commits = 0
    started = completed = 0
    ini_time = 0.0
    # ex = [Initiator, src addr for 500, src addr for 4500, messages sent]

    def start() -> None:
        nonlocal started, ini_time
        k = started
        started += 1
        ip = f"198.51.{100 + k // 30000}.2"
        a500, a4500 = (ip, 1024 + 2 * (k % 30000)), (ip, 1025 + 2 * (k % 30000))
        inner = base_inner + 1 + k
        cfg = P.PeerConfig(psk=args.psk.encode(), identity="bench0.example", phase1=phase1, force_nat=True,
                           phase2=P.Phase2(local_ts=f"{inner >> 24}.{inner >> 16 & 255}.{inner >> 8 & 255}."
                                                    f"{inner & 255}/32", remote_ts="10.1.0.0/24"))
        t = time.perf_counter()
        ini = P.Initiator(cfg, a500, RESPONDER)
        out = ini.start()
        ini_time += time.perf_counter() - t
        ex = [ini, a500, a4500, 0]
        by_addr[a500] = by_addr[a4500] = ex
        to_responder(ex, out)

    def to_responder(ex: list, out: P.Outgoing) -> None:
        addr = ex[1] if out.port == P.IKE_PORT else ex[2]
        data = out.data[4:] if out.port == ike_cfg.natt_port else out.data  # the service strips the marker
        queue.append(("r", ex, data, out.port, addr))

    def commit() -> None:
        nonlocal commit_time, commits
        if args.store != "sqlite" or not backend._queue:
            return
        t = time.perf_counter()
        prof.enable()
        backend._write(backend._take())
        prof.disable()
        commit_time += time.perf_counter() - t
        commits += 1

    for _ in range(min(args.concurrency, args.n)):
        start()
    last_commit = time.perf_counter()
    t_begin = time.perf_counter()
    while completed < args.n or queue:  # the last QM3s still reach the responder
        if not queue:
            if args.store == "sqlite" and backend._queue:
                commit()  # everyone in flight waits for the group commit
                last_commit = time.perf_counter()
                continue
            raise SystemExit(f"stalled after {completed} exchanges; engine counters "
                             f"{ {k: v for k, v in engine.counters.items() if v} }")
        item = queue.popleft()
        if item[0] == "r":
            _, ex, data, port, addr = item
            step = STEPS[min(ex[3], len(STEPS) - 1)]
            ex[3] += 1
            t = time.perf_counter()
            prof.enable()
            engine.received(data, addr, port)
            prof.disable()
            step_time[step] += time.perf_counter() - t
        else:
            _, ex, data, port = item
            t = time.perf_counter()
            out = ex[0].receive(data, port)
            ini_time += time.perf_counter() - t
            if out is not None:
                to_responder(ex, out)
            if ex[0].done:
                completed += 1
                if started < args.n:
                    start()
        if time.perf_counter() - last_commit >= flush_interval:
            commit()
            last_commit = time.perf_counter()
    commit()
    wall = time.perf_counter() - t_begin
    n = completed
    if engine.counters["child_installed"] != n:
        raise SystemExit(f"only {engine.counters['child_installed']} of {n} children installed: "
                         f"{ {k: v for k, v in engine.counters.items() if v} }")
    responder = sum(step_time.values()) + commit_time

    print(f"narsuite IKE responder in-process: {n} MM+QM, group {args.group} "
          f"({'ecp256' if args.group == 19 else 'modp2048' if args.group == 14 else args.group}), "
          f"{args.concurrency} in flight, store {args.store}, log {args.log}, esp engine "
          f"{'off' if args.no_esp else 'on'}, Python {sys.version.split()[0]}")
    print(f"  wall {wall:.2f} s; responder {1000 * responder / n:.3f} ms per MM+QM "
          f"(= {n / responder:.0f} MM+QM/s on one core, profiler {'off' if args.no_profile else 'on'}); "
          f"initiators {1000 * ini_time / n:.3f} ms")
    print("  responder by message (ms per MM+QM): " + ", ".join(
        f"{s} {1000 * step_time[s] / n:.3f}" for s in STEPS) +
        (f", store commits {1000 * commit_time / n:.3f} ({commits} commits)" if args.store == "sqlite" else ""))

    if args.no_profile:
        report_floor(args.group)
        devnull.close()
        return
    st = pstats.Stats(prof)
    report_categories(st, n)
    report_top(st, n, args.top)
    report_floor(args.group)
    if args.dump:
        st.dump_stats(args.dump)
        print(f"\npstats written to {args.dump} (python -m pstats {args.dump}; snakeviz)")
    devnull.close()


# ---------------------------------------------------------------------------
# exclusive time by category

CRYPTO_PRF = {"prf", "digest", "skeyid_psk", "skeyid_sig", "derive_phase1", "encryption_key", "hash_i", "hash_r",
              "qm_hash1", "qm_hash2", "qm_hash3", "informational_hash", "transaction_hash", "keymat", "esp_keys",
              "natd_hash", "_iv_from", "initial_iv", "phase2_iv", "_spi", "_mid", "_cookies", "constant_time_equal"}
CRYPTO_DH = {"generate", "shared", "check_peer", "group"}
CRYPTO_AES = {"encrypt", "decrypt", "pad", "_check_iv", "iv", "update", "accept", "forget", "_remember",
              "block_size", "payload_chain", "__init__"}


def _category_of(func: tuple) -> str:
    """A category for a profiled function, or "" (generic C functions, cryptography's
    wrappers): then its time goes to its callers' categories."""
    file, _line, name = func
    f = file.replace("\\", "/")
    if file == "~":
        if "sqlite3" in name:
            return "store: SQLite"
        if "_hashlib" in name or "hmac" in name or "sha" in name.lower() or "md5" in name:
            return "hash/PRF (HMAC, SHA)"
        if "urandom" in name or "_random" in name or "getrandbits" in name:
            return "random"
        return ""  # len, isinstance, OpenSSL calls...: by caller (DH or AES for cryptography's)
    if "narsuite/ike/crypto.py" in f:
        if name in CRYPTO_DH or name.startswith(("ModpGroup", "EcpGroup")):
            return "Diffie-Hellman (cryptography/OpenSSL)"
        if name in CRYPTO_PRF:
            return "hash/PRF (HMAC, SHA)"
        if name in ("random_nonce", "random_cookie"):
            return "random"
        if name in CRYPTO_AES:
            return "AES-CBC + IV chain"
        return "crypto (other)"
    if "/cryptography/" in f:
        return ""  # python wrappers of cryptography: by caller
    if f.endswith(("/hmac.py", "/hashlib.py")):
        return "hash/PRF (HMAC, SHA)"
    if f.endswith(("/secrets.py", "/random.py")):
        return "random"
    if "narsuite/ike/v2/keys.py" in f:
        if name in ("generate", "shared", "group"):
            return "Diffie-Hellman (cryptography/OpenSSL)"
        if name in ("seal", "open", "open_encrypted", "seal_fragments", "__init__", "overhead"):
            return "AES-CBC + IV chain"
        return "hash/PRF (HMAC, SHA)"
    if "narsuite/ike/isakmp.py" in f or "narsuite/ike/v2/wire.py" in f or f.endswith("/struct.py"):
        return "ISAKMP codec"
    if "narsuite/store/" in f or "/sqlite3/" in f:
        return "store (records, indexes, subscribers)"
    if "narsuite/esp/" in f:
        return "esp engine (store subscriber)"
    if "twisted/logger" in f or "narsuite/logs.py" in f or "/string.py" in f:
        return "logging"
    if "twisted/internet/defer.py" in f:
        return "Deferreds"
    if "twisted/internet/task.py" in f or "twisted/internet/base.py" in f:
        return "timers (callLater)"
    if f.endswith("/ipaddress.py"):
        return "ipaddress"
    if "<attrs generated" in f or "/attr/" in f:
        return "attrs (records, configs)"
    if "narsuite/sadb.py" in f or "narsuite/ike/records.py" in f:
        return "store (records, indexes, subscribers)"
    if "narsuite/ike/" in f:
        return "IKE engine logic"
    return "other Python"


def _charge(func: tuple, amount: float, stats: dict, out: dict[str, float], depth: int = 0) -> None:
    cat = _category_of(func)
    if cat or depth > 6:
        out[cat or "other Python"] += amount
        return
    # generic C function or cryptography wrapper: split over callers by the time spent on each edge
    callers = stats[func][4]
    total = sum(edge[2] for edge in callers.values())
    if not callers or total <= 0:
        out["other Python"] += amount
        return
    for caller, edge in callers.items():
        _charge(caller, amount * edge[2] / total, stats, out, depth + 1)


def report_categories(st: pstats.Stats, n: int, unit: str = "MM+QM") -> None:
    stats = st.stats  # type: ignore[attr-defined]
    out: dict[str, float] = defaultdict(float)
    for func, (_cc, _nc, tt, _ct, _callers) in stats.items():
        if tt > 0:
            _charge(func, tt, stats, out)
    total = sum(out.values())
    print(f"\n  exclusive time by category (profiled: {1000 * total / n:.3f} ms per {unit}, incl. profiler overhead)")
    for cat, t in sorted(out.items(), key=lambda kv: -kv[1]):
        print(f"    {cat:<42} {1000 * t / n:8.3f} ms  {100 * t / total:5.1f} %")


def _label(func: tuple) -> str:
    file, line, name = func
    if file == "~":
        return name
    f = file.replace("\\", "/")
    for marker in ("/narsuite/", "/twisted/", "/cryptography/", "/site-packages/", "/lib/python3"):
        if marker in f:
            f = f[f.index(marker) + 1:]
            break
    return f"{f}:{line}({name})"


def report_top(st: pstats.Stats, n: int, top: int, unit: str = "MM+QM") -> None:
    stats = st.stats  # type: ignore[attr-defined]
    rows = [(func, nc, tt, ct) for func, (_cc, nc, tt, ct, _callers) in stats.items()]
    print(f"\n  top {top} by cumulative time (per {unit})")
    print(f"    {'cum ms':>8} {'own ms':>8} {'calls':>7}  function")
    for func, nc, tt, ct in sorted(rows, key=lambda r: -r[3])[:top]:
        print(f"    {1000 * ct / n:8.3f} {1000 * tt / n:8.3f} {nc / n:7.1f}  {_label(func)}")
    print(f"\n  top {top} by own time (per {unit})")
    print(f"    {'own ms':>8} {'cum ms':>8} {'calls':>7}  function")
    for func, nc, tt, ct in sorted(rows, key=lambda r: -r[2])[:top]:
        print(f"    {1000 * tt / n:8.3f} {1000 * ct / n:8.3f} {nc / n:7.1f}  {_label(func)}")


def report_floor(group_number: int, rounds: int = 300) -> None:
    """What the responder's Diffie-Hellman must cost: generate + check the peer's value + shared."""
    g = crypto.group(group_number)
    _priv, peer = g.generate()
    t = time.perf_counter()
    for _ in range(rounds):
        private, _public = g.generate()
        g.check_peer(peer)
        g.shared(private, peer)
    dh = (time.perf_counter() - t) / rounds
    t = time.perf_counter()
    for _ in range(rounds):
        g.generate()
    gen = (time.perf_counter() - t) / rounds
    print(f"\n  floor, no profiler: responder DH of one MM (generate + check_peer + shared) {1000 * dh:.3f} ms, "
          f"of which generate {1000 * gen:.3f} ms")


def parser(description: str, unit: str, n: int, groups: tuple[int, ...]) -> argparse.ArgumentParser:
    """The options every in-process IKE profile takes (this one and profile_ikev2.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--group", type=int, default=19, choices=groups)
    ap.add_argument("-n", type=int, default=n, help=f"{unit} exchanges in all")
    ap.add_argument("--concurrency", type=int, default=32, help="exchanges in flight")
    ap.add_argument("--store", default="sqlite", choices=("sqlite", "memory"))
    ap.add_argument("--log", default="info", choices=("debug", "info", "warn", "error"))
    ap.add_argument("--no-esp", action="store_true", help="no ESP engine subscribed to the store")
    ap.add_argument("--psk", default="bench-psk-0123456789")
    ap.add_argument("--client-net", default="10.128.0.0/9")
    ap.add_argument("--no-profile", action="store_true", help="timings only, without cProfile's overhead")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--dump", help="write the pstats here")
    return ap


def main(argv: list[str] | None = None) -> int:
    run(parser(__doc__.split("\n\n")[0], "MM+QM", 1000, (19, 14)).parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
