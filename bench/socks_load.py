"""SOCKS5 load generator and local targets for bench/bench_socks.py.

Plain blocking sockets, one client per process (``multiprocessing``, fork): a
blocking ``recv`` costs one syscall and no event-loop bookkeeping, so each
worker spends its CPU in the kernel rather than in Python, and the workers
run on both cores.  The same code drives every server under test.

Targets (each its own process, started before the servers under test):

* TCP echo: epoll loop, echoes the 16 bytes a CONNECT-rate client sends,
  then closes; the client reads the echo, waits for the server to pass the
  close on, and closes too.  The targets close first on purpose: the side that
  closes first keeps the connection in TIME_WAIT for 60 s, and if that were
  the client and the proxy's outgoing side, ~3,000 connections/s would hold
  every ephemeral port of 127.0.0.1 within seconds (Dante then fails its
  bind() of the outgoing socket and answers REP=3).  This way TIME_WAIT lands
  on the listening ports, which use no ephemeral port;
* TCP sink / source: one thread per connection; the sink discards with
  ``MSG_TRUNC`` (no copy to user space), the source ``sendall``s a
  preallocated buffer (bulk relay);
* UDP echo: ``recvfrom`` / ``sendto`` (UDP ASSOCIATE round trips).

Workers start together at an agreed ``time.monotonic()`` instant (a system-wide
clock on Linux) and count only operations that complete inside the window
``[t_start, t_end)``, so the caller can sample the server's CPU at exactly
those instants.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import resource
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["free_port", "Targets", "run_workers", "connect_worker", "upload_worker",
           "download_worker", "udp_worker", "socks_connect", "udp_associate"]

BULK_CHUNK = 256 * 1024
PAYLOAD = b"narsuite-bench16"  # 16 bytes


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A free port below the ephemeral range, so that no outgoing connection (there
    are tens of thousands per run) takes it between this check and the server's bind."""
    lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, lo - 12000), lo)
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port")


def _listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(4096)
    return s


# ---------------------------------------------------------------- targets

def _tcp_echo(port: int, ready: Any) -> None:
    lsock = _listen(port)
    lsock.setblocking(False)
    ep = select.epoll()
    ep.register(lsock.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    got: dict[int, int] = {}
    lfd = lsock.fileno()
    ready.set()
    while True:
        for fd, _ in ep.poll():
            if fd == lfd:
                while True:
                    try:
                        c, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    conns[c.fileno()] = c
                    ep.register(c.fileno(), select.EPOLLIN)
                continue
            c = conns[fd]
            try:
                data = c.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                got[fd] = got.get(fd, 0) + len(data)
                try:
                    c.send(data)  # a few bytes: fits the send buffer
                    if got[fd] < len(PAYLOAD):
                        continue
                except OSError:
                    pass
            # the target closes first (see module docstring: TIME_WAIT lands on listening ports)
            ep.unregister(fd)
            del conns[fd]
            got.pop(fd, None)
            c.close()


def _sink_conn(c: socket.socket) -> None:
    buf = bytearray(BULK_CHUNK)
    try:
        while c.recv_into(buf, BULK_CHUNK, socket.MSG_TRUNC):
            pass
    except OSError:
        pass
    c.close()


def _source_conn(c: socket.socket) -> None:
    buf = memoryview(bytes(BULK_CHUNK))
    try:
        while True:
            c.sendall(buf)
    except OSError:
        pass
    c.close()


def _tcp_threaded(port: int, handler: Callable[[socket.socket], None], ready: Any) -> None:
    lsock = _listen(port)
    ready.set()
    while True:
        c, _ = lsock.accept()
        threading.Thread(target=handler, args=(c,), daemon=True).start()


def _udp_echo(port: int, ready: Any) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", port))
    ready.set()
    while True:
        data, addr = s.recvfrom(65536)
        s.sendto(data, addr)


class Targets:
    """The four local targets, each in its own process; ``close()`` ends them by PID."""

    def __init__(self) -> None:
        self.echo = free_port()
        self.sink = free_port()
        self.source = free_port()
        self.udp_echo = free_port(socket.SOCK_DGRAM)
        ctx = mp.get_context("fork")
        self.procs: list[Any] = []
        for fn, args in ((_tcp_echo, (self.echo,)), (_tcp_threaded, (self.sink, _sink_conn)),
                         (_tcp_threaded, (self.source, _source_conn)), (_udp_echo, (self.udp_echo,))):
            ready = ctx.Event()
            p = ctx.Process(target=fn, args=(*args, ready), daemon=True)
            p.start()
            if not ready.wait(10):
                raise RuntimeError(f"target {fn.__name__} did not start")
            self.procs.append(p)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()  # by PID: multiprocessing sends SIGKILL to p.pid
            p.join(5)


# ---------------------------------------------------------------- SOCKS5 client

def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = s.recv(n)
    while len(data) < n:
        more = s.recv(n - len(data))
        if not more:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += more
    return data


def _read_reply(s: socket.socket) -> tuple[int, str, int]:
    """Reads a SOCKS5 reply; returns (REP, BND.ADDR, BND.PORT)."""
    head = _recv_exact(s, 4)
    if head[0] != 5:
        raise ConnectionError(f"reply version {head[0]}")
    atyp = head[3]
    if atyp == 1:
        rest = _recv_exact(s, 6)
        addr = socket.inet_ntoa(rest[:4])
    elif atyp == 4:
        rest = _recv_exact(s, 18)
        addr = socket.inet_ntop(socket.AF_INET6, rest[:16])
    elif atyp == 3:
        ln = _recv_exact(s, 1)[0]
        rest = _recv_exact(s, ln + 2)
        addr = rest[:ln].decode()
    else:
        raise ConnectionError(f"reply ATYP {atyp}")
    return head[1], addr, struct.unpack("!H", rest[-2:])[0]


def _request(cmd: int, host: str, port: int) -> bytes:
    return bytes((5, cmd, 0, 1)) + socket.inet_aton(host) + struct.pack("!H", port)


def _negotiate(proxy: tuple[str, int], timeout: float) -> socket.socket:
    s = socket.socket()
    s.settimeout(timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.connect(proxy)
    s.sendall(b"\x05\x01\x00")
    if _recv_exact(s, 2) != b"\x05\x00":
        raise ConnectionError("method 'none' refused")
    return s


def socks_connect(proxy: tuple[str, int], dst: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    """SOCKS5 no-auth CONNECT; returns the relayed socket."""
    s = _negotiate(proxy, timeout)
    try:
        s.sendall(_request(1, *dst))
        rep, _, _ = _read_reply(s)
        if rep != 0:
            raise ConnectionError(f"CONNECT refused, REP={rep}")
    except BaseException:
        s.close()
        raise
    return s


def udp_associate(proxy: tuple[str, int], timeout: float = 5.0) -> tuple[socket.socket, socket.socket, tuple[str, int]]:
    """UDP ASSOCIATE announcing our real UDP address; (control, udp socket, relay address)."""
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    s = _negotiate(proxy, timeout)
    s.sendall(_request(3, *u.getsockname()))
    rep, addr, port = _read_reply(s)
    if rep != 0:
        raise ConnectionError(f"UDP ASSOCIATE refused, REP={rep}")
    if addr in ("0.0.0.0", "::"):
        addr = proxy[0]
    return s, u, (addr, port)


# ---------------------------------------------------------------- workers
# Each returns a dict: ops, bytes, errors, cpu (seconds of this process).

def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def connect_worker(proxy: tuple[str, int], target: tuple[str, int], t_start: float, t_end: float) -> dict:
    """CONNECT, send 16 bytes, read the echo and the relayed close, close; again until t_end."""
    req = _request(1, *target)
    ops = errors = 0
    last_error = ""
    now = time.monotonic
    cpu0 = None
    while True:
        t = now()
        if t >= t_end:
            break
        if cpu0 is None and t >= t_start:
            cpu0 = _cpu()
        s = socket.socket()
        try:
            s.settimeout(5.0)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.connect(proxy)
            s.sendall(b"\x05\x01\x00")
            if _recv_exact(s, 2) != b"\x05\x00":
                raise ConnectionError("method 'none' refused")
            s.sendall(req)
            rep, _, _ = _read_reply(s)
            if rep != 0:
                raise ConnectionError(f"CONNECT refused, REP={rep}")
            s.sendall(PAYLOAD)
            if _recv_exact(s, len(PAYLOAD)) != PAYLOAD:
                raise ConnectionError("echo mismatch")
            if s.recv(1):  # the echo closes; the server must pass the close on
                raise ConnectionError("data after the echo")
            s.close()
            if t_start <= now() < t_end:
                ops += 1
        except OSError as e:
            s.close()
            errors += 1
            last_error = repr(e)
            time.sleep(0.01)
    return {"ops": ops, "bytes": 0, "errors": errors, "last_error": last_error,
            "cpu": _cpu() - (cpu0 if cpu0 is not None else _cpu())}


def upload_worker(proxy: tuple[str, int], target: tuple[str, int], t_start: float, t_end: float) -> dict:
    """CONNECT to the sink and send as fast as the relay takes it; counts bytes sent in the window."""
    s = socks_connect(proxy, target)
    s.settimeout(10.0)
    buf = memoryview(bytes(BULK_CHUNK))
    now = time.monotonic
    sent = 0
    cpu0 = None
    while True:
        t = now()
        if t >= t_end:
            break
        if cpu0 is None and t >= t_start:
            cpu0 = _cpu()
        s.sendall(buf)
        if t >= t_start:
            sent += BULK_CHUNK
    s.close()
    return {"ops": 0, "bytes": sent, "errors": 0, "last_error": "", "cpu": _cpu() - (cpu0 or _cpu())}


def download_worker(proxy: tuple[str, int], target: tuple[str, int], t_start: float, t_end: float) -> dict:
    """CONNECT to the source and receive (discarding, MSG_TRUNC) as fast as the relay sends."""
    s = socks_connect(proxy, target)
    s.settimeout(10.0)
    buf = bytearray(BULK_CHUNK)
    now = time.monotonic
    got = 0
    cpu0 = None
    while True:
        t = now()
        if t >= t_end:
            break
        if cpu0 is None and t >= t_start:
            cpu0 = _cpu()
        n = s.recv_into(buf, BULK_CHUNK, socket.MSG_TRUNC)
        if not n:
            raise ConnectionError("source closed")
        if t >= t_start:
            got += n
    s.close()
    return {"ops": 0, "bytes": got, "errors": 0, "last_error": "", "cpu": _cpu() - (cpu0 or _cpu())}


def udp_worker(proxy: tuple[str, int], target: tuple[str, int], t_start: float, t_end: float) -> dict:
    """UDP ASSOCIATE, then ping-pong 32-byte datagrams through the relay to the UDP echo."""
    ctrl, u, relay = udp_associate(proxy)
    u.settimeout(0.2)
    header = b"\x00\x00\x00\x01" + socket.inet_aton(target[0]) + struct.pack("!H", target[1])
    now = time.monotonic
    ops = errors = 0
    last_error = ""
    cpu0 = None
    seq = 0
    while True:
        t = now()
        if t >= t_end:
            break
        if cpu0 is None and t >= t_start:
            cpu0 = _cpu()
        seq += 1
        body = struct.pack("!Q", seq) + b"u" * 24
        u.sendto(header + body, relay)
        try:
            while True:  # skip late replies to earlier (timed-out) datagrams
                data = u.recv(2048)
                if data[-32:] == body:
                    break
        except TimeoutError:
            errors += 1
            last_error = "timeout (datagram lost)"
            continue
        if data[:3] != b"\x00\x00\x00":
            errors += 1
            last_error = f"bad UDP header {data[:10].hex()}"
            continue
        if t_start <= now() < t_end:
            ops += 1
    ctrl.close()
    u.close()
    return {"ops": ops, "bytes": 0, "errors": errors, "last_error": last_error,
            "cpu": _cpu() - (cpu0 or _cpu())}


def _child(fn: Callable[..., dict], args: tuple, q: Any) -> None:
    try:
        q.put(fn(*args))
    except BaseException as e:  # report, do not hang the parent
        q.put({"ops": 0, "bytes": 0, "errors": 1, "last_error": repr(e), "cpu": 0.0})


def run_workers(fn: Callable[..., dict], n: int, proxy: tuple[str, int], target: tuple[str, int],
                t_start: float, t_end: float) -> tuple[list[Any], Any]:
    """Starts n worker processes; returns (processes, queue). Collect with ``collect``."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, (proxy, target, t_start, t_end), q), daemon=True)
             for _ in range(n)]
    for p in procs:
        p.start()
    return procs, q


def collect(procs: list[Any], q: Any, timeout: float) -> dict:
    """Sums the workers' results; kills (by PID) any worker that does not report in time."""
    total = {"ops": 0, "bytes": 0, "errors": 0, "last_error": "", "cpu": 0.0, "workers": len(procs)}
    deadline = time.monotonic() + timeout
    for _ in procs:
        try:
            r = q.get(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:
            total["errors"] += 1
            total["last_error"] = "worker did not report"
            break
        for k in ("ops", "bytes", "errors", "cpu"):
            total[k] += r[k]
        total["last_error"] = r["last_error"] or total["last_error"]
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1)
    return total


if __name__ == "__main__":  # smoke test against a running proxy: python bench/socks_load.py PORT
    import sys

    port = int(sys.argv[1])
    tg = Targets()
    try:
        t0 = time.monotonic() + 0.3
        ps, qq = run_workers(connect_worker, 4, ("127.0.0.1", port), ("127.0.0.1", tg.echo), t0, t0 + 2)
        print(collect(ps, qq, 10))
    finally:
        tg.close()
    os._exit(0)
