"""Network namespaces, veth links and bridges for integration tests.

A :class:`Lab` owns a set of network namespaces ("hosts"), the veth pairs
between them and Linux bridges ("switches").  Every namespace name carries
the PID of the creating process and a random tag::

    nsl<pid>x<4 hex>-<host>        e.g.  nsl41213x9f0c-nat1

so parallel runs never collide and namespaces left behind by a process that
died (``kill -9``) can be recognised and removed by :func:`sweep_stale`.

Teardown happens on :meth:`Lab.close` / context exit (also when the block
raised), at interpreter exit (``atexit``) and on SIGINT/SIGTERM (the handler
tears down every lab of the process, then lets the previous behaviour of the
signal happen).  Processes started with :meth:`Host.popen` run in their own
process group; teardown terminates, then kills, each group by its PID before
the namespaces are deleted.  Deleting a namespace destroys the veths and
bridges inside it.

Everything is done with the ``ip``, ``nft``, ``sysctl`` and ``ss`` commands;
nothing is ever created in, or changed in, the namespace of the caller.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Union

__all__ = [
    "DEFAULT_PREFIX",
    "NETNS_DIR",
    "CommandError",
    "Host",
    "Lab",
    "LabError",
    "Link",
    "Segment",
    "SegmentPort",
    "lab_namespaces",
    "lab_unavailable_reason",
    "parse_netns_name",
    "sweep_stale",
]

DEFAULT_PREFIX = "nsl"
NETNS_DIR = "/run/netns"
IFNAMSIZ = 15

Cmd = Union[str, Sequence[str]]

_HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_PREFIX_RE = re.compile(r"^[a-z]{1,8}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class LabError(Exception):
    """The lab could not do what was asked."""


class CommandError(LabError, subprocess.CalledProcessError):
    """A command run by the lab exited non-zero; the message holds its output."""

    def __init__(self, returncode, cmd, output=None, stderr=None, netns=None):
        subprocess.CalledProcessError.__init__(self, returncode, cmd, output, stderr)
        self.netns = netns

    def __str__(self) -> str:
        cmd = self.cmd if isinstance(self.cmd, str) else shlex.join(map(str, self.cmd))
        where = f" in netns {self.netns}" if self.netns else ""
        parts = [f"command {cmd!r}{where} exited with status {self.returncode}"]
        for label, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text:
                if isinstance(text, bytes):
                    text = text.decode("utf-8", "replace")
                parts.append(f"--- {label} ---\n{text.rstrip()}")
        return "\n".join(parts)


# ---------------------------------------------------------------------------
# low-level helpers


def _run(argv: Sequence[str], *, input=None, timeout: float = 30, check: bool = True,
         netns: str | None = None, text: bool = True) -> subprocess.CompletedProcess:
    """Run argv (never through a shell), raising :class:`CommandError` on failure."""
    if input is not None and isinstance(input, (bytes, bytearray)):
        text = False
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, timeout=timeout, text=text,
            stdin=subprocess.DEVNULL if input is None else None,
        )
    except FileNotFoundError as exc:
        raise LabError(f"cannot run {argv[0]!r}: {exc}") from exc
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, list(argv), proc.stdout, proc.stderr, netns=netns)
    return proc


def _ip_batch(netns: str, lines: Iterable[str]) -> None:
    """Run several ``ip`` commands inside netns with one ``ip -batch``."""
    script = "".join(line + "\n" for line in lines)
    if script:
        _run(["ip", "-n", netns, "-batch", "-"], input=script, netns=netns)


def _netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def parse_netns_name(name: str, prefix: str = DEFAULT_PREFIX) -> tuple[int, str, str] | None:
    """Return ``(pid, tag, host)`` for a lab namespace name, ``None`` for any other name."""
    m = re.match(rf"^{re.escape(prefix)}(\d+)x([0-9a-f]{{4}})-(.+)$", name)
    if not m:
        return None
    return int(m.group(1)), m.group(2), m.group(3)


def lab_namespaces(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Names of all namespaces (of any process) that look like lab namespaces."""
    return [n for n in _list_netns() if parse_netns_name(n, prefix)]


_BOOT_TIME: float | None = None


def _boot_time() -> float:
    global _BOOT_TIME
    if _BOOT_TIME is None:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    _BOOT_TIME = float(line.split()[1])
                    break
            else:  # pragma: no cover - every Linux has btime
                _BOOT_TIME = 0.0
    return _BOOT_TIME


def _process_start(pid: int) -> float | None:
    """Start time (epoch seconds) of a live, non-zombie process; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = stat[stat.rindex(")") + 2:].split()
    if rest[0] in ("Z", "X"):
        return None
    ticks = int(rest[19])  # field 22 of proc_pid_stat(5)
    return _boot_time() + ticks / os.sysconf("SC_CLK_TCK")


def _creator_alive(name: str, pid: int) -> bool:
    """Is the process that created namespace ``name`` still running?

    A live process with the same PID that started *after* the namespace was
    created is a different process (PID reuse): the namespace is stale.
    """
    started = _process_start(pid)
    if started is None:
        return False
    try:
        created = os.stat(_netns_path(name)).st_mtime
    except FileNotFoundError:
        return True  # vanished meanwhile: nothing to sweep
    return started <= created + 2.0  # clock-tick rounding and btime granularity


def _netns_ids(names: Iterable[str]) -> dict[tuple[int, int], str]:
    ids = {}
    for name in names:
        try:
            st = os.stat(_netns_path(name))
        except FileNotFoundError:
            continue
        ids[(st.st_dev, st.st_ino)] = name
    return ids


def _pids_in_netns(names: Iterable[str]) -> dict[str, list[int]]:
    """PIDs of the processes living in each of the given namespaces (like ``ip netns pids``)."""
    ids = _netns_ids(names)
    found: dict[str, list[int]] = {}
    if not ids:
        return found
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        name = ids.get((st.st_dev, st.st_ino))
        if name is not None:
            found.setdefault(name, []).append(int(entry))
    return found


def _kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _delete_netns(names: Iterable[str]) -> list[str]:
    """Delete namespaces (in parallel); returns error messages for those that failed."""
    procs = []
    for name in names:
        if not os.path.exists(_netns_path(name)):
            continue
        procs.append((name, subprocess.Popen(
            ["ip", "netns", "delete", name], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    errors = []
    for name, proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0 and os.path.exists(_netns_path(name)):
            errors.append(f"ip netns delete {name}: {err.strip() or out.strip()}")
    return errors


def sweep_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove lab namespaces whose creating process no longer exists.

    The processes still running inside such namespaces (servers a dead lab
    started) are killed first.  Returns the names of the removed namespaces.
    """
    stale = []
    for name in _list_netns():
        parsed = parse_netns_name(name, prefix)
        if parsed and not _creator_alive(name, parsed[0]):
            stale.append(name)
    if not stale:
        return []
    for pids in _pids_in_netns(stale).values():
        _kill_pids(pids)
    errors = _delete_netns(stale)
    if errors:
        raise LabError("could not remove stale namespaces:\n" + "\n".join(errors))
    return stale


_UNAVAILABLE: list[str | None] = []


def lab_unavailable_reason() -> str | None:
    """Why the lab cannot work here (``None`` if it can).  Probed once per process."""
    if _UNAVAILABLE:
        return _UNAVAILABLE[0]
    reason = None
    if sys.platform != "linux":
        reason = "the network lab needs Linux network namespaces"
    elif os.geteuid() != 0:
        reason = "the network lab needs root (network namespaces, veth, nftables)"
    else:
        missing = [t for t in ("ip", "nft", "sysctl", "ss") if shutil.which(t) is None]
        if missing:
            reason = "the network lab needs these commands: " + ", ".join(missing)
    if reason is None:
        probe = f"{DEFAULT_PREFIX}{os.getpid()}x{secrets.token_hex(2)}-probe"
        try:
            _run(["ip", "netns", "add", probe], timeout=10)
        except (LabError, subprocess.TimeoutExpired) as exc:
            reason = f"`ip netns add` does not work here: {exc}"
        else:
            try:
                _run(["ip", "-n", probe, "link", "add", "p0", "type", "veth",
                      "peer", "name", "p1"], timeout=10)
            except (LabError, subprocess.TimeoutExpired) as exc:
                reason = f"cannot create veth pairs: {exc}"
            finally:
                _delete_netns([probe])
    _UNAVAILABLE.append(reason)
    return reason


# ---------------------------------------------------------------------------
# teardown on exit and on signals

_LIVE_LABS: list[Lab] = []
_LIVE_LOCK = threading.RLock()
_HOOKS_INSTALLED = False
_PREVIOUS_HANDLERS: dict[int, object] = {}


def _teardown_all() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE_LABS)
    for lab in reversed(labs):
        if lab._owner_pid != os.getpid():
            continue  # a forked child must not tear down its parent's lab
        try:
            lab.close()
        except Exception as exc:  # pragma: no cover - best effort at exit
            print(f"narsuite.lab: teardown of {lab!r} failed: {exc}", file=sys.stderr)


def _on_signal(signum, frame):
    _teardown_all()
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(previous):
        return previous(signum, frame)
    # SIG_DFL (or a handler installed from C, None): die the default way.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(_teardown_all)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still covers us
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if previous is signal.SIG_IGN:
            continue
        _PREVIOUS_HANDLERS[signum] = previous
        signal.signal(signum, _on_signal)


# ---------------------------------------------------------------------------
# small programs run inside namespaces

_PING_SCRIPT = r"""
import os, socket, struct, sys, time
dst, timeout = sys.argv[1], float(sys.argv[2])
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
ident = os.getpid() & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
pkt = struct.pack('!BBHHH', 8, 0, 0, ident, 1) + b'narsuite-lab'
pkt = pkt[:2] + struct.pack('!H', csum(pkt)) + pkt[4:]
try:
    s.sendto(pkt, (dst, 0))
except OSError as e:
    print(e); sys.exit(2)
end = time.monotonic() + timeout
while True:
    left = end - time.monotonic()
    if left <= 0:
        print('timeout'); sys.exit(1)
    s.settimeout(left)
    try:
        data, addr = s.recvfrom(4096)
    except socket.timeout:
        print('timeout'); sys.exit(1)
    ihl = (data[0] & 15) * 4
    t = data[ihl]
    if t == 0 and addr[0] == dst and data[ihl + 4:ihl + 6] == struct.pack('!H', ident):
        sys.exit(0)
    if t in (3, 11) and len(data) >= ihl + 8 + 28:
        inner = data[ihl + 8:]
        iihl = (inner[0] & 15) * 4
        if inner[iihl] == 8 and inner[iihl + 4:iihl + 6] == struct.pack('!H', ident):
            print('icmp type %d code %d from %s' % (t, data[ihl + 1], addr[0])); sys.exit(1)
"""


# ---------------------------------------------------------------------------
# the objects


@dataclass(eq=False)
class Host:
    """One network namespace of a :class:`Lab`."""

    lab: Lab = field(repr=False)
    name: str
    netns: str
    forwarding: bool = False
    _procs: list = field(default_factory=list, repr=False)
    _next_if: int = field(default=0, repr=False)
    _ifnames: set = field(default_factory=set, repr=False)

    # -- running things ---------------------------------------------------

    def _argv(self, cmd: Cmd) -> list[str]:
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        return ["ip", "netns", "exec", self.netns, *map(str, cmd)]

    def run(self, cmd: Cmd, check: bool = True, timeout: float = 30, input=None,
            text: bool = True) -> subprocess.CompletedProcess:
        """Run cmd (argv list, or a string for ``sh -c``) in the namespace and wait.

        stdout/stderr are captured (text unless ``text=False`` or input is
        bytes).  With check, a non-zero exit raises :class:`CommandError`
        whose message includes both outputs; a timeout raises
        :class:`subprocess.TimeoutExpired`.
        """
        self.lab._check_open()
        return _run(self._argv(cmd), input=input, timeout=timeout, check=check,
                    netns=self.netns, text=text)

    def popen(self, cmd: Cmd, **kw) -> subprocess.Popen:
        """Start cmd in the namespace, in its own process group, tracked for teardown."""
        self.lab._check_open()
        kw.pop("process_group", None)
        kw["start_new_session"] = True
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self._argv(cmd), **kw)
        self._procs.append(proc)
        return proc

    @property
    def pids(self) -> list[int]:
        """PIDs of the tracked processes (started with :meth:`popen`) still running."""
        return [p.pid for p in self._procs if p.poll() is None]

    def stop(self, proc: subprocess.Popen, timeout: float = 2.0) -> int:
        """Terminate (then kill) the process group of proc; return its exit status."""
        _stop_groups([proc], timeout)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    # -- configuration ----------------------------------------------------

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``ip -n <netns> args...``."""
        return _run(["ip", "-n", self.netns, *map(str, args)], check=check, netns=self.netns)

    def sysctl(self, **settings) -> None:
        """Set sysctls in the namespace: ``host.sysctl(**{"net.ipv4.ip_forward": 1})``."""
        self.run(["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])

    def addr(self, ifname: str) -> str:
        """First IPv4 address (without prefix length) configured on ifname."""
        out = self.ip("-j", "-4", "addr", "show", "dev", ifname).stdout
        for link in json.loads(out or "[]"):
            for info in link.get("addr_info", []):
                if info.get("family") == "inet":
                    return info["local"]
        raise LabError(f"{self.name}: no IPv4 address on {ifname}")

    def route(self, dst: str, via: str, dev: str | None = None) -> None:
        """Add (or replace) a route to dst via a gateway."""
        args = ["route", "replace", dst, "via", via]
        if dev:
            args += ["dev", dev]
        self.ip(*args)

    def default_route(self, via: str, dev: str | None = None) -> None:
        self.route("default", via, dev)

    def enable_forwarding(self) -> None:
        """Turn on IPv4 forwarding in this namespace."""
        self.sysctl(**{"net.ipv4.ip_forward": 1})
        self.forwarding = True

    def nft(self, ruleset: str) -> None:
        """Load nftables ruleset text (``nft -f -``) in the namespace."""
        self.run(["nft", "-f", "-"], input=ruleset)

    def masquerade(self, out_if: str, udp_timeout: int | None = None) -> None:
        """Masquerade everything leaving through out_if (``table ip nat``) and forward.

        udp_timeout (seconds) sets this namespace's UDP conntrack timeouts,
        both ``nf_conntrack_udp_timeout`` (unreplied) and
        ``nf_conntrack_udp_timeout_stream`` (replied): on this kernel they are
        per-namespace sysctls.
        """
        if not _IFNAME_RE.match(out_if):
            raise ValueError(f"bad interface name {out_if!r}")
        self.nft(
            "table ip nat {\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "{out_if}" masquerade\n'
            "  }\n"
            "}\n")
        settings = {"net.ipv4.ip_forward": 1}
        if udp_timeout is not None:
            seconds = int(udp_timeout)
            if seconds < 1:
                raise ValueError("udp_timeout must be at least 1 second")
            # nft loaded nf_nat/nf_conntrack above, so these sysctls exist now.
            settings["net.netfilter.nf_conntrack_udp_timeout"] = seconds
            settings["net.netfilter.nf_conntrack_udp_timeout_stream"] = seconds
        self.sysctl(**settings)
        self.forwarding = True

    def set_udp_timeout(self, seconds: int) -> None:
        """Change the UDP conntrack timeouts (unreplied and stream) of this namespace."""
        self.sysctl(**{"net.netfilter.nf_conntrack_udp_timeout": int(seconds),
                       "net.netfilter.nf_conntrack_udp_timeout_stream": int(seconds)})

    # -- checks -------------------------------------------------------------

    def wait_port(self, port: int, proto: str = "tcp", timeout: float = 10) -> None:
        """Wait until something listens on port (``ss -ln`` in the namespace).

        proto is ``"tcp"`` or ``"udp"`` (a bound UDP socket counts).  Raises
        :class:`TimeoutError` after timeout seconds.
        """
        flag = {"tcp": "-t", "udp": "-u"}[proto]
        deadline = time.monotonic() + timeout
        while True:
            out = self.run(["ss", "-H", "-l", "-n", flag, f"sport = :{int(port)}"],
                           check=False).stdout
            if out.strip():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name}: nothing listens on {proto}/{port} "
                                   f"after {timeout} s")
            time.sleep(0.02)

    def ping(self, dst: str, timeout: float = 1.0) -> bool:
        """Send one ICMP echo request to dst; True if the matching reply came back.

        Uses a raw socket from a small Python program (the box has no
        ``ping``); an ICMP error or a missing route gives False at once.
        """
        proc = self.run([sys.executable, "-S", "-c", _PING_SCRIPT, dst, str(timeout)],
                        check=False, timeout=timeout + 10)
        return proc.returncode == 0

    # -- internals ----------------------------------------------------------

    def _claim_ifname(self, ifname: str | None) -> str:
        if ifname is None:
            while f"eth{self._next_if}" in self._ifnames:
                self._next_if += 1
            ifname = f"eth{self._next_if}"
        if not _IFNAME_RE.match(ifname) or ifname in ("lo", ".", ".."):
            raise ValueError(f"bad interface name {ifname!r} (max {IFNAMSIZ} chars)")
        if ifname in self._ifnames:
            raise ValueError(f"{self.name} already has an interface {ifname!r}")
        self._ifnames.add(ifname)
        return ifname

    def __str__(self) -> str:
        return self.name


@dataclass(eq=False)
class Link:
    """A veth pair between two hosts."""

    a: Host
    b: Host
    a_if: str
    b_if: str
    a_addr: str | None  # CIDR, e.g. "10.0.0.1/24"
    b_addr: str | None
    mtu: int | None = None

    @property
    def a_ip(self) -> str | None:
        return self.a_addr.split("/")[0] if self.a_addr else None

    @property
    def b_ip(self) -> str | None:
        return self.b_addr.split("/")[0] if self.b_addr else None


@dataclass(eq=False)
class SegmentPort:
    """One member of a switched segment: host, its interface and address."""

    host: Host
    ifname: str
    addr: str | None  # CIDR
    port: str  # the bridge port (in the switch namespace)

    @property
    def ip(self) -> str | None:
        return self.addr.split("/")[0] if self.addr else None


@dataclass(eq=False)
class Segment:
    """A Linux bridge in its own namespace with a veth to each member."""

    name: str
    host: Host  # the switch namespace
    bridge: str
    members: list[SegmentPort]

    def port(self, host: Host | str) -> SegmentPort:
        hname = host if isinstance(host, str) else host.name
        for member in self.members:
            if member.host.name == hname:
                return member
        raise KeyError(hname)

    def ifname(self, host: Host | str) -> str:
        return self.port(host).ifname

    def ip(self, host: Host | str) -> str | None:
        return self.port(host).ip


def _stop_groups(procs: Sequence[subprocess.Popen], timeout: float = 2.0) -> None:
    """SIGTERM each process group (pgid == pid), wait, then SIGKILL the rest."""
    try:
        _signal_groups(procs, timeout)
    finally:
        for proc in procs:  # reap, so that no zombie is left behind
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass


def _signal_groups(procs: Sequence[subprocess.Popen], timeout: float) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        pending = []
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                continue
            pending.append(proc)
        if not pending:
            return
        deadline = time.monotonic() + wait
        alive = pending
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if p.poll() is None or _group_alive(p.pid)]
            if alive:
                time.sleep(0.01)
        if not alive:
            return
        procs = alive


def _group_alive(pgid: int) -> bool:
    """Does process group pgid still have a member that is not a zombie?

    (``killpg(pgid, 0)`` succeeds for a group of zombies, e.g. a grandchild
    orphaned to an init that reaps slowly.)
    """
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def scripts_on_path() -> None:
    """Put the directory of the running interpreter first on PATH.

    The console scripts a lab runs in its namespaces (twistd, narctl, narsuite-lab) live
    beside the interpreter -- in a virtual environment that is not on PATH unless activated,
    and the README runs ``.venv/bin/python -m pytest`` (and the benches run as
    ``.venv/bin/python bench/...``) without activating it.
    """
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + path


class Lab:
    """A set of namespaces, links and switches that is always torn down.

    ``with Lab() as lab: x = lab.host("x"); ...``
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, sweep: bool = True):
        if not _PREFIX_RE.match(prefix):
            raise ValueError("prefix must be 1-8 lowercase letters")
        self.prefix = prefix
        self._owner_pid = os.getpid()
        self.hosts: dict[str, Host] = {}
        self.links: list[Link] = []
        self.segments: dict[str, Segment] = {}
        self.closed = False
        self._next_ifindex = 100
        self._close_lock = threading.RLock()
        if sweep:
            try:
                sweep_stale(prefix)
            except LabError as exc:  # someone else's leftovers must not stop this lab
                warnings.warn(f"narsuite.lab: sweep failed: {exc}", RuntimeWarning, stacklevel=2)
        existing = _list_netns()
        while True:
            self.tag = secrets.token_hex(2)
            stem = f"{prefix}{self._owner_pid}x{self.tag}-"
            if not any(n.startswith(stem) for n in existing):
                break
        self.stem = stem
        scripts_on_path()
        _install_hooks()
        with _LIVE_LOCK:
            _LIVE_LABS.append(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.hosts)} namespaces"
        return f"<Lab {self.stem}* {state}>"

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except Exception as teardown_error:
            if exc is None:
                raise
            print(f"narsuite.lab: teardown failed: {teardown_error}", file=sys.stderr)

    # -- building -------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise LabError("this lab is closed")

    def _resolve(self, host: Host | str) -> Host:
        if isinstance(host, Host):
            if host.lab is not self:
                raise LabError(f"{host.name} belongs to another lab")
            return host
        return self.hosts[host]

    @property
    def namespaces(self) -> list[str]:
        return [h.netns for h in self.hosts.values()]

    def host(self, name: str, forwarding: bool = False) -> Host:
        """Create a namespace (lo up) named ``<stem><name>``."""
        self._check_open()
        if not _HOST_NAME_RE.match(name):
            raise ValueError(f"bad host name {name!r}")
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists already")
        netns = self.stem + name
        _run(["ip", "netns", "add", netns])
        host = Host(self, name, netns)
        self.hosts[name] = host  # registered before anything else can fail
        host.ip("link", "set", "lo", "up")
        if forwarding:
            host.enable_forwarding()
        return host

    def _veth(self, a: Host, a_if: str, b: Host, b_if: str, mtu: int | None) -> None:
        # Explicit, lab-wide distinct ifindexes.  Both ends of a veth pair
        # created in fresh namespaces would otherwise both get ifindex 2; a
        # device whose ifindex equals its iflink gets its carrier-up handled
        # by the rate-limited ("non-urgent") linkwatch path, so it drops
        # every packet for up to a second after it is brought up.
        a_idx, b_idx = self._next_ifindex, self._next_ifindex + 1
        self._next_ifindex += 2
        extra = ["mtu", str(int(mtu))] if mtu else []
        _run(["ip", "-n", a.netns, "link", "add", "name", a_if, "index", str(a_idx), *extra,
              "type", "veth", "peer", "name", b_if, "index", str(b_idx), "netns", b.netns,
              *extra], netns=a.netns)

    def link(self, a: Host | str, b: Host | str, a_addr: str | None = "10.0.0.1/24",
             b_addr: str | None = "10.0.0.2/24", a_if: str | None = None,
             b_if: str | None = None, mtu: int | None = None) -> Link:
        """Connect two hosts with a veth pair, address both ends and bring them up.

        Interface names default to ``eth0``, ``eth1``... per host; addresses
        may be None (no address).
        """
        self._check_open()
        a, b = self._resolve(a), self._resolve(b)
        if a is b:
            raise ValueError("cannot link a host to itself")
        a_if = a._claim_ifname(a_if)
        b_if = b._claim_ifname(b_if)
        self._veth(a, a_if, b, b_if, mtu)
        for host, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            lines = [f"addr add {addr} dev {ifname}"] if addr else []
            lines.append(f"link set dev {ifname} up")
            _ip_batch(host.netns, lines)
        link = Link(a, b, a_if, b_if, a_addr, b_addr, mtu)
        self.links.append(link)
        return link

    def switch(self, name: str, members: Sequence[tuple], mtu: int | None = None) -> Segment:
        """A bridge in its own namespace (host ``name``) with a veth to each member.

        members: ``(host, "addr/len")`` or ``(host, "addr/len", ifname)``
        tuples; the member side gets ``eth<n>`` unless ifname is given.
        """
        self._check_open()
        sw = self.host(name)
        bridge = "br0"
        sw._claim_ifname(bridge)
        lines = [f"link add name {bridge} type bridge stp_state 0",
                 f"link set dev {bridge} up"]
        ports: list[SegmentPort] = []
        for idx, member in enumerate(members):
            host, addr = self._resolve(member[0]), member[1]
            ifname = host._claim_ifname(member[2] if len(member) > 2 else None)
            port_name = host.name[:IFNAMSIZ]
            if port_name in sw._ifnames or not _IFNAME_RE.match(port_name):
                port_name = f"p{idx}"
            port_name = sw._claim_ifname(port_name)
            ports.append(SegmentPort(host, ifname, addr, port_name))
        _ip_batch(sw.netns, lines[:1])
        for p in ports:
            self._veth(sw, p.port, p.host, p.ifname, mtu)
            lines.append(f"link set dev {p.port} master {bridge} up")
            mlines = [f"addr add {p.addr} dev {p.ifname}"] if p.addr else []
            mlines.append(f"link set dev {p.ifname} up")
            _ip_batch(p.host.netns, mlines)
        _ip_batch(sw.netns, lines[1:])
        seg = Segment(name, sw, bridge, ports)
        self.segments[name] = seg
        return seg

    # -- teardown -------------------------------------------------------------

    def close(self) -> None:
        """Kill tracked processes, then any process left in the namespaces, then delete them."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
            with _LIVE_LOCK:
                if self in _LIVE_LABS:
                    _LIVE_LABS.remove(self)
            procs = [p for h in self.hosts.values() for p in h._procs]
            if procs:
                _stop_groups(procs)
            for h in self.hosts.values():
                h._procs.clear()
            names = self.namespaces
            # also anything created with our stem but not (yet) registered
            names += [n for n in _list_netns() if n.startswith(self.stem) and n not in names]
            for pids in _pids_in_netns(names).values():
                _kill_pids(pids)
            errors = _delete_netns(names)
            if errors:
                raise LabError("lab teardown incomplete:\n" + "\n".join(errors))
