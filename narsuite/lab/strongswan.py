"""A real strongSwan ``charon`` inside a lab namespace, driven through ``swanctl``.

Why: the ``ike`` role has to interoperate with the IKE implementation people actually run.
strongSwan is the reference peer for the lab tests (as initiator against our responder, as
responder against our test initiator ``tests/ike_peer.py``, and as the benchmark anchor).

How one instance is isolated (everything lives under ``workdir``, nothing under ``/etc``):

* **its own strongswan.conf**, given with ``STRONGSWAN_CONF``: an explicit ``charon.load``
  list (``load_modular = no``), so ``/etc/strongswan.d`` is never read.  ``kernel-libipsec``
  comes *before* ``kernel-netlink``: the kernel here has no ESP (see platform-facts.md), so
  charon must do ESP in user space over a TUN device; loaded in the other order the netlink
  IPsec backend would win and installing the CHILD SA would fail.  ``resolve`` is never
  loaded: it would rewrite the host's ``/etc/resolv.conf`` (a namespace shares ``/etc``).
* **its own /run**: charon hard-codes its pid file (``/run/charon.pid``) and refuses to
  start when it exists, so two instances (G and R1) would collide.  charon runs under
  ``unshare --mount --propagation private`` with a tmpfs mounted on ``/run`` first.
* **its vici socket in workdir** (``charon.vici``): reachable by ``swanctl --uri`` from
  outside the private ``/run``.  swanctl runs in the caller's namespace; the socket is a
  file, so no ``ip netns exec`` is needed for it.
* **its log in workdir** (``charon.log``, ``filelog`` with ``flush_line``), levels per
  subsystem configurable (``log_levels``).

Known quirk: kernel-libipsec always sends a NAT-D that does not match (fake NAT-D), so a
charon with this plugin set always believes it is NATed and floats to UDP 4500 -- tests
must not conclude "a NAT was detected" from that alone when both sides are strongSwan.

Process lifetime: :meth:`Charon.start` uses ``Host.popen`` (own process group, tracked by
the lab), so lab teardown kills it whatever happens; :meth:`Charon.stop` terminates it by
PID (SIGTERM, then SIGKILL) and is idempotent.  See docs/lab.md, "strongSwan in the lab".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from .netns import Host, LabError

__all__ = [
    "CHARON",
    "DEFAULT_LOG_LEVELS",
    "DEFAULT_PLUGINS",
    "REQUIRED_PLUGINS",
    "SWANCTL",
    "Charon",
    "ChildSA",
    "IkeSA",
    "InitiateResult",
    "available_plugins",
    "ikev1_client_conf",
    "ikev1_gateway_conf",
    "ikev2_client_conf",
    "parse_list_sas",
    "strongswan_unavailable_reason",
]

CHARON = "/usr/lib/ipsec/charon"
SWANCTL = "swanctl"
PLUGIN_DIR = "/usr/lib/ipsec/plugins"

#: charon's plugins for IKEv1/IKEv2 remote access with PSK, XAUTH, mode-config and certs.
#: Order matters: kernel-libipsec before kernel-netlink (user-space ESP, see module doc).
#: Not loaded: resolve (would write the host's /etc/resolv.conf), stroke (no ipsec.conf).
DEFAULT_PLUGINS: tuple[str, ...] = (
    "random", "nonce", "openssl", "aes", "sha1", "sha2", "md5", "hmac", "gcm", "gmp", "kdf",
    "pem", "pkcs1", "pkcs8", "x509", "pubkey", "revocation", "constraints",
    "kernel-libipsec", "kernel-netlink", "socket-default", "vici", "updown",
    "xauth-generic", "attr",
)

#: swanctl's own plugins: reading keys and certificates for --load-all.
SWANCTL_PLUGINS: tuple[str, ...] = ("random", "nonce", "openssl", "pem", "pkcs1", "pkcs8", "x509", "pubkey")

#: filelog levels per subsystem (-1 silent .. 4 raw data); ike/enc/net/cfg are what one
#: reads to understand an exchange.
DEFAULT_LOG_LEVELS: Mapping[str, int] = {"default": 1, "ike": 2, "enc": 1, "net": 1, "cfg": 2, "knl": 1}

#: swanctl.conf sub-directories --load-all looks at (relative to the conf file).
CRED_DIRS = ("x509", "x509ca", "x509aa", "x509ocsp", "x509crl", "x509ac", "pubkey",
             "private", "rsa", "ecdsa", "bliss", "pkcs8", "pkcs12")


#: Plugins the lab's peers cannot do without, and the Debian package that ships each.  ``openssl``
#: gives the ECP groups and AES-GCM: it is only a Recommends of libstrongswan, so an
#: ``apt-get install --no-install-recommends`` leaves it out and charon then refuses ecp256
#: ("DH group ECP_256 not supported") instead of failing loudly.
REQUIRED_PLUGINS: Mapping[str, str] = {
    "openssl": "libstrongswan-standard-plugins",
    "kernel-libipsec": "libcharon-extra-plugins",
    "kernel-netlink": "libstrongswan",
    "socket-default": "libstrongswan",
    "vici": "libstrongswan",
    "xauth-generic": "libcharon-extauth-plugins",
}


def available_plugins(names: Sequence[str], plugin_dir: str = PLUGIN_DIR) -> list[str]:
    """``names`` without the plugins whose shared object is not installed (e.g. ``kdf`` before 5.9.10).

    charon refuses to start when an explicitly loaded plugin is missing only if it is marked
    critical (``name!``); unmarked it logs a warning, but a clean list keeps the log readable.
    """
    return [n for n in names if os.path.exists(os.path.join(plugin_dir, f"libstrongswan-{n}.so"))]


def strongswan_unavailable_reason() -> str | None:
    """Why a charon cannot run here (``None`` if it can): binaries, plugins, unshare, TUN."""
    if not os.path.exists(CHARON):
        return f"strongSwan charon not installed ({CHARON})"
    for tool in (SWANCTL, "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    for plugin, package in REQUIRED_PLUGINS.items():
        if not available_plugins([plugin]):
            return (f"strongSwan plugin {plugin} not installed "
                    f"({PLUGIN_DIR}/libstrongswan-{plugin}.so): apt-get install {package}")
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun missing (kernel-libipsec needs TUN)"
    return None


# ---------------------------------------------------------------------------
# records


@attrs.frozen
class InitiateResult:
    """What ``swanctl --initiate`` said: ``ok`` is its exit status 0, ``output`` its stdout+stderr."""

    ok: bool
    returncode: int
    output: str

    def __bool__(self) -> bool:
        return self.ok


@attrs.frozen
class ChildSA:
    """One CHILD SA as ``swanctl --list-sas`` shows it (the fields tests look at)."""

    name: str
    uniqueid: str
    state: str  # INSTALLED, REKEYING, ...
    mode: str  # TUNNEL, TRANSPORT
    protocol: str  # ESP, AH
    encap: bool  # UDP encapsulation (NAT-T)
    spi_in: int
    spi_out: int
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]
    encr: str = ""  # "AES_CBC-128", "AES_GCM_16-256"
    integ: str = ""  # "HMAC_SHA1_96" ("" for AEAD)
    dh_group: str = ""  # PFS group, "" without
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0


@attrs.frozen
class IkeSA:
    """One IKE SA as ``swanctl --list-sas`` shows it."""

    name: str
    uniqueid: str
    version: int  # 1 or 2
    state: str  # ESTABLISHED, CONNECTING, ...
    local_host: str
    local_port: int
    local_id: str
    remote_host: str
    remote_port: int
    remote_id: str
    initiator: bool
    spi_i: bytes  # the initiator's cookie/SPI (8 bytes)
    spi_r: bytes
    nat_local: bool
    nat_remote: bool
    nat_fake: bool  # one side faked NAT (kernel-libipsec does that)
    encr: str = ""
    integ: str = ""
    prf: str = ""
    dh_group: str = ""
    local_vips: tuple[str, ...] = ()
    remote_vips: tuple[str, ...] = ()
    remote_xauth_id: str = ""
    children: tuple[ChildSA, ...] = ()

    @property
    def established(self) -> bool:
        return self.state == "ESTABLISHED"

    @property
    def nat_detected(self) -> bool:
        """Any NAT (local, remote or faked): the SA floated to UDP 4500."""
        return self.nat_local or self.nat_remote or self.nat_fake


# ---------------------------------------------------------------------------
# --list-sas --raw parsing
#
# swanctl --raw prints a vici message as nested ``key=value``, ``key {...}`` sections and
# ``key [item item]`` lists, e.g.
#   list-sa event {r1 {uniqueid=1 version=1 state=ESTABLISHED ... child-sas {r1-2 {...}}}}
# Values never contain spaces or braces for the fields we read (IDs with spaces would be
# quoted by nothing, so we keep the tokenizer tolerant: a value runs to the next space).

_TOKEN = re.compile(r"\s*(?:(\{)|(\})|(\[)|(\])|([^\s={}\[\]]+)=([^\s{}\[\]]*)|([^\s={}\[\]]+))")


def _parse_vici_raw(text: str) -> list[tuple[str, dict]]:
    """Parse ``swanctl --raw`` output into a list of ``(message name, section dict)``."""
    messages: list[tuple[str, dict]] = []
    pos = 0
    stack: list[dict] = []
    pending: list[str] = []  # bare words seen before a "{" (message name, section name)
    list_key: str | None = None
    list_items: list[str] = []
    last_empty_key: str | None = None
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            break
        pos = m.end()
        lbrace, rbrace, lbrack, rbrack, key, value, word = m.groups()
        if list_key is not None:
            if rbrack:
                last_empty_key = None
                stack[-1][list_key] = list_items
                list_key, list_items = None, []
            elif word or key:
                list_items.append(word if word else f"{key}={value}")
            continue
        if lbrace:
            section: dict = {}
            name = " ".join(pending)
            pending = []
            if not stack:
                messages.append((name, section))
            else:
                stack[-1][name] = section
            stack.append(section)
        elif rbrace:
            if stack:
                stack.pop()
        elif lbrack:
            # "key=[a b]" (what swanctl prints) or "key [a b]"
            list_key = " ".join(pending) if pending else (last_empty_key or "")
            pending = []
        elif key is not None:
            last_empty_key = key if value == "" else None
            if stack:
                stack[-1][key] = value
            continue
        elif word is not None:
            pending.append(word)
        last_empty_key = None
    return messages


def _hex_bytes(value: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        return b""


def _hex_int(value: str) -> int:
    try:
        return int(value, 16)
    except ValueError:
        return 0


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0


def _encr(d: Mapping[str, str]) -> str:
    alg = d.get("encr-alg", "")
    return f"{alg}-{d['encr-keysize']}" if alg and d.get("encr-keysize") else alg


def _child(name: str, d: Mapping) -> ChildSA:
    return ChildSA(
        name=d.get("name", name), uniqueid=d.get("uniqueid", ""), state=d.get("state", ""),
        mode=d.get("mode", ""), protocol=d.get("protocol", ""), encap=d.get("encap") == "yes",
        spi_in=_hex_int(d.get("spi-in", "")), spi_out=_hex_int(d.get("spi-out", "")),
        local_ts=tuple(d.get("local-ts", ())), remote_ts=tuple(d.get("remote-ts", ())),
        encr=_encr(d), integ=d.get("integ-alg", ""), dh_group=d.get("dh-group", ""),
        bytes_in=_int(d.get("bytes-in", "0")), bytes_out=_int(d.get("bytes-out", "0")),
        packets_in=_int(d.get("packets-in", "0")), packets_out=_int(d.get("packets-out", "0")),
    )


def parse_list_sas(raw: str) -> list[IkeSA]:
    """The IKE SAs in ``swanctl --list-sas --raw`` output (one ``list-sa event`` per SA)."""
    sas = []
    for msg_name, body in _parse_vici_raw(raw):
        if msg_name != "list-sa event":
            continue
        for name, d in body.items():
            if not isinstance(d, dict):
                continue
            children = d.get("child-sas", {})
            sas.append(IkeSA(
                name=name, uniqueid=d.get("uniqueid", ""), version=_int(d.get("version", "0")),
                state=d.get("state", ""), local_host=d.get("local-host", ""),
                local_port=_int(d.get("local-port", "0")), local_id=d.get("local-id", ""),
                remote_host=d.get("remote-host", ""), remote_port=_int(d.get("remote-port", "0")),
                remote_id=d.get("remote-id", ""), initiator=d.get("initiator") == "yes",
                spi_i=_hex_bytes(d.get("initiator-spi", "")), spi_r=_hex_bytes(d.get("responder-spi", "")),
                nat_local=d.get("nat-local") == "yes", nat_remote=d.get("nat-remote") == "yes",
                nat_fake=d.get("nat-fake") == "yes",
                encr=_encr(d), integ=d.get("integ-alg", ""), prf=d.get("prf-alg", ""),
                dh_group=d.get("dh-group", ""),
                local_vips=tuple(d.get("local-vips", ())), remote_vips=tuple(d.get("remote-vips", ())),
                remote_xauth_id=d.get("remote-xauth-id", ""),
                children=tuple(_child(cname, c) for cname, c in children.items() if isinstance(c, dict)),
            ))
    return sas


# ---------------------------------------------------------------------------
# the instance


class Charon:
    """One charon daemon in ``host``'s namespace, its files under ``workdir``.

    ``plugins`` replaces :data:`DEFAULT_PLUGINS` (missing ones are dropped, see
    :func:`available_plugins`); ``extra_conf`` is strongswan.conf text inserted inside the
    ``charon { }`` section (e.g. ``"retransmit_tries = 2\\n"``); ``log_levels`` overrides
    entries of :data:`DEFAULT_LOG_LEVELS`.
    """

    def __init__(self, host: Host, workdir: str | os.PathLike, *, plugins: Sequence[str] | None = None,
                 extra_conf: str = "", log_levels: Mapping[str, int] | None = None) -> None:
        self.host = host
        self.workdir = Path(workdir).resolve()
        self.plugins = available_plugins(DEFAULT_PLUGINS if plugins is None else plugins)
        self.extra_conf = extra_conf
        self.log_levels = {**DEFAULT_LOG_LEVELS, **(log_levels or {})}
        self.conf_path = self.workdir / "strongswan.conf"
        self.log_path = self.workdir / "charon.log"
        self.vici_path = self.workdir / "charon.vici"
        self.swanctl_dir = self.workdir / "swanctl"
        self.proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<Charon on {self.host.name} pid={self.pid} {self.workdir}>"

    @property
    def uri(self) -> str:
        return f"unix://{self.vici_path}"

    @property
    def pid(self) -> int | None:
        """PID of the running instance (the process ``unshare`` exec'd into charon), else None."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        return self.proc.pid

    # -- configuration -------------------------------------------------------

    def strongswan_conf(self) -> str:
        """The private strongswan.conf text (also what swanctl reads, via STRONGSWAN_CONF)."""
        levels = "".join(f"        {k} = {v}\n" for k, v in self.log_levels.items())
        return (
            "charon {\n"
            "  load_modular = no\n"
            f"  load = {' '.join(self.plugins)}\n"
            "  install_virtual_ip = yes\n"
            "  filelog {\n"
            "    charon {\n"
            f"      path = {self.log_path}\n"
            "      time_format = %H:%M:%S\n"
            "      ike_name = yes\n"
            "      append = yes\n"
            "      flush_line = yes\n"
            f"{levels}"
            "    }\n"
            "  }\n"
            "  syslog {\n"
            "    daemon {\n"
            "      default = -1\n"
            "    }\n"
            "  }\n"
            "  plugins {\n"
            "    vici {\n"
            f"      socket = unix://{self.vici_path}\n"
            "    }\n"
            "    kernel-libipsec {\n"
            "      allow_peer_ts = yes\n"
            "    }\n"
            "  }\n"
            f"{self.extra_conf}"
            "}\n"
            "swanctl {\n"
            f"  load = {' '.join(available_plugins(SWANCTL_PLUGINS))}\n"
            "}\n"
        )

    def _env(self) -> dict[str, str]:
        return {**os.environ, "STRONGSWAN_CONF": str(self.conf_path)}

    # -- life cycle ----------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Charon:
        """Write the config, start charon, and return once vici answers (``swanctl --version``).

        Raises :class:`LabError` (with the log tail) if charon dies or vici stays silent.
        """
        if self.pid is not None:
            raise LabError(f"{self!r} already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.strongswan_conf())
        if self.vici_path.exists():
            self.vici_path.unlink()
        # Host.popen puts charon in its own process group and tracks it: lab teardown
        # terminates it even when the test never calls stop().
        script = f"mount -t tmpfs -o mode=0755 tmpfs /run && exec {CHARON}"
        with open(self.workdir / "charon.stderr", "ab") as stderr:
            self.proc = self.host.popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                env=self._env(), stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LabError(f"charon on {self.host.name} exited with {self.proc.returncode}\n"
                               f"{self._tail()}")
            if self.vici_path.exists():
                probe = self.swanctl("--version", "--daemon", check=False, timeout=5)
                if probe.returncode == 0:
                    return self
            if time.monotonic() >= deadline:
                self.stop()
                raise LabError(f"charon on {self.host.name}: vici did not answer within {timeout} s\n"
                               f"{self._tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 3.0) -> int | None:
        """Terminate charon by PID (SIGTERM, then SIGKILL after ``timeout``); idempotent.

        Returns the exit status (None if it was never started).
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None or self.proc in self.host._procs:
            self.host.stop(self.proc, timeout=timeout)
        return self.proc.returncode

    def __enter__(self) -> Charon:
        return self.start() if self.pid is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- swanctl ---------------------------------------------------------------

    def swanctl(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run ``swanctl --uri unix://<workdir>/charon.vici args...`` (in the caller's namespace)."""
        argv = [SWANCTL, *args, "--uri", self.uri]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self._env(),
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{' '.join(argv)} timed out after {timeout} s") from exc
        if check and proc.returncode != 0:
            raise LabError(f"{' '.join(argv)} exited with {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def load(self, swanctl_conf: str, files: Mapping[str, bytes | str] | None = None) -> str:
        """Write ``swanctl/swanctl.conf`` (+ ``files``), then ``swanctl --load-all``; return its output.

        ``files`` maps paths relative to the swanctl directory (``"x509ca/ca.pem"``,
        ``"private/gw.key"``, ``"x509/gw.pem"``) to their contents.  Loading replaces what
        was loaded before (connections and secrets not in the file are unloaded).
        """
        self.swanctl_dir.mkdir(parents=True, exist_ok=True)
        for sub in CRED_DIRS:
            (self.swanctl_dir / sub).mkdir(exist_ok=True)
        for rel, content in (files or {}).items():
            path = (self.swanctl_dir / rel).resolve()
            if self.swanctl_dir not in path.parents:
                raise ValueError(f"{rel!r} is outside the swanctl directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                content = content.encode()
            path.write_bytes(content)
            if path.parent.name in ("private", "rsa", "ecdsa", "pkcs8", "pkcs12"):
                path.chmod(0o600)
        conf = self.swanctl_dir / "swanctl.conf"
        conf.write_text(swanctl_conf)
        proc = self.swanctl("--load-all", "--noprompt", "--file", str(conf))
        return proc.stdout + proc.stderr

    def initiate(self, child: str | None = None, ike: str | None = None, timeout: float = 30) -> InitiateResult:
        """``swanctl --initiate`` a CHILD SA (and its IKE SA), waiting up to ``timeout`` s.

        Never raises for a failed negotiation: the result carries the exit status and the
        log lines swanctl relayed (``ok`` is False then).
        """
        if child is None and ike is None:
            raise ValueError("initiate needs child= or ike=")
        args = ["--initiate"]
        if child is not None:
            args += ["--child", child]
        if ike is not None:
            args += ["--ike", ike]
        args += ["--timeout", str(max(1, int(timeout)))]
        try:
            proc = self.swanctl(*args, check=False, timeout=timeout + 10)
        except LabError as exc:
            return InitiateResult(False, -1, str(exc))
        return InitiateResult(proc.returncode == 0, proc.returncode, proc.stdout + proc.stderr)

    def terminate(self, ike: str | None = None, child: str | None = None, timeout: float = 10) -> InitiateResult:
        """``swanctl --terminate`` an IKE SA (by connection name) or a CHILD SA."""
        args = ["--terminate", "--timeout", str(max(1, int(timeout)))]
        if ike is not None:
            args += ["--ike", ike]
        elif child is not None:
            args += ["--child", child]
        else:
            raise ValueError("terminate needs ike= or child=")
        proc = self.swanctl(*args, check=False, timeout=timeout + 10)
        return InitiateResult(proc.returncode == 0, proc.returncode, proc.stdout + proc.stderr)

    def list_sas(self) -> list[IkeSA]:
        """The IKE SAs (with their CHILD SAs) charon knows now."""
        return parse_list_sas(self.swanctl("--list-sas", "--raw").stdout)

    def list_sas_text(self) -> str:
        """``swanctl --list-sas`` as a human reads it (for assertion messages)."""
        return self.swanctl("--list-sas", check=False).stdout

    def wait_sa(self, predicate=None, timeout: float = 10.0) -> IkeSA:
        """Wait for an IKE SA satisfying ``predicate`` (default: established); ``TimeoutError`` otherwise."""
        predicate = predicate or (lambda sa: sa.established)
        deadline = time.monotonic() + timeout
        while True:
            for sa in self.list_sas():
                if predicate(sa):
                    return sa
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no matching IKE SA on {self.host.name} after {timeout} s:\n"
                                   f"{self.list_sas_text()}")
            time.sleep(0.1)

    # -- logs ----------------------------------------------------------------------

    def log_text(self) -> str:
        """The whole charon log so far (empty before the first line is written)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self, lines: int = 40) -> str:
        text = self.log_text()
        try:
            text += (self.workdir / "charon.stderr").read_text(errors="replace")
        except FileNotFoundError:
            pass
        return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------
# ready-made swanctl.conf texts (the lab tests' and the product tests' peers)


def _quote(value: str) -> str:
    if '"' in value or "\n" in value:
        raise ValueError(f"unsupported character in swanctl value {value!r}")
    return f'"{value}"'


def ikev1_client_conf(
    gateway: str,
    psk: str,
    *,
    name: str = "home",
    child: str = "net",
    local_id: str = "client.example",
    remote_id: str = "gw.example",
    remote_ts: str = "10.1.0.0/24",
    xauth_user: str | None = None,
    xauth_password: str | None = None,
    mode_config: bool | None = None,
    aggressive: bool = False,
    proposals: str = "aes128-sha1-modp2048,aes256-sha256-modp2048,aes128-sha1-ecp256",
    esp_proposals: str = "aes128-sha1,aes128gcm16",
    dpd_delay: str | None = None,
) -> str:
    """swanctl.conf of an IKEv1 remote-access client: Main Mode PSK, optional XAUTH round
    (``xauth_user``/``xauth_password``, xauth-generic) and mode-config (``vips = 0.0.0.0``,
    on by default with XAUTH), tunnel to ``remote_ts``.  ``name``/``child`` are what
    :meth:`Charon.initiate` takes; ``dpd_delay`` (``"2s"``) makes the client probe an idle
    gateway (RFC 3706 R-U-THERE).
    """
    if mode_config is None:
        mode_config = xauth_user is not None
    xauth = ""
    xauth_secret = ""
    if xauth_user is not None:
        xauth = (f"    local-2 {{\n      auth = xauth\n      xauth_id = {_quote(xauth_user)}\n    }}\n")
        xauth_secret = (f"  xauth-1 {{\n    id = {_quote(xauth_user)}\n"
                        f"    secret = {_quote(xauth_password or '')}\n  }}\n")
    return (
        "connections {\n"
        f"  {name} {{\n"
        "    version = 1\n"
        f"    aggressive = {'yes' if aggressive else 'no'}\n"
        f"    proposals = {proposals}\n"
        f"    remote_addrs = {gateway}\n"
        + (f"    dpd_delay = {dpd_delay}\n" if dpd_delay else "")
        + ("    vips = 0.0.0.0\n" if mode_config else "")
        + "    local-1 {\n      auth = psk\n"
        f"      id = {_quote(local_id)}\n    }}\n"
        f"{xauth}"
        "    remote {\n      auth = psk\n"
        f"      id = {_quote(remote_id)}\n    }}\n"
        "    children {\n"
        f"      {child} {{\n"
        f"        remote_ts = {remote_ts}\n"
        f"        esp_proposals = {esp_proposals}\n"
        "      }\n"
        "    }\n"
        "  }\n"
        "}\n"
        "secrets {\n"
        f"  ike-1 {{\n    secret = {_quote(psk)}\n  }}\n"
        f"{xauth_secret}"
        "}\n"
    )


def ikev1_gateway_conf(
    local_addr: str,
    psk: str,
    *,
    name: str = "rw",
    child: str = "net",
    local_id: str = "gw.example",
    local_ts: str = "10.1.0.0/24",
    remote_ts: str | None = None,
    pool: str | None = None,
    xauth_users: Mapping[str, str] | None = None,
    proposals: str = "aes128-sha1-modp2048,aes256-sha256-modp2048,aes128-sha1-ecp256,aes256-sha256-ecp256",
    esp_proposals: str = "aes128-sha1,aes128gcm16,aes256-sha256",
    aggressive: bool = False,
    extra_connection: str = "",
) -> str:
    """swanctl.conf of an IKEv1 responder (strongSwan as the gateway G).

    PSK for any peer; with ``xauth_users`` (name -> password) a second, XAUTH round
    (xauth-generic); with ``pool`` (CIDR) mode-config hands out virtual IPs.  Without a pool,
    ``remote_ts`` should name the clients' private network: behind a NAT an IKEv1 client
    proposes its private address, which the default ``dynamic`` (its public one) refuses
    with INVALID-ID-INFORMATION.
    """
    xauth = "    remote-2 {\n      auth = xauth\n    }\n" if xauth_users else ""
    secrets = "".join(
        f"  xauth-{i} {{\n    id = {_quote(user)}\n    secret = {_quote(pw)}\n  }}\n"
        for i, (user, pw) in enumerate((xauth_users or {}).items(), 1))
    pools = f"pools {{\n  {name}-pool {{\n    addrs = {pool}\n  }}\n}}\n" if pool else ""
    return (
        "connections {\n"
        f"  {name} {{\n"
        "    version = 1\n"
        f"    aggressive = {'yes' if aggressive else 'no'}\n"
        f"    proposals = {proposals}\n"
        f"    local_addrs = {local_addr}\n"
        + (f"    pools = {name}-pool\n" if pool else "")
        + "    local {\n      auth = psk\n"
        f"      id = {_quote(local_id)}\n    }}\n"
        "    remote-1 {\n      auth = psk\n    }\n"
        f"{xauth}"
        "    children {\n"
        f"      {child} {{\n"
        f"        local_ts = {local_ts}\n"
        + (f"        remote_ts = {remote_ts}\n" if remote_ts else "")
        + f"        esp_proposals = {esp_proposals}\n"
        "      }\n"
        "    }\n"
        f"{extra_connection}"
        "  }\n"
        "}\n"
        f"{pools}"
        "secrets {\n"
        f"  ike-1 {{\n    secret = {_quote(psk)}\n  }}\n"
        f"{secrets}"
        "}\n"
    )


def ikev2_client_conf(
    gateway: str,
    psk: str | None,
    *,
    name: str = "home",
    child: str = "net",
    local_id: str = "client.example",
    remote_id: str = "gw.example",
    remote_ts: str = "10.1.0.0/24",
    vips: bool = True,
    proposals: str = "aes128-sha256-ecp256,aes256-sha256-modp2048",
    esp_proposals: str = "aes128gcm16,aes128-sha256",
    local_auth: str = "psk",
    remote_auth: str = "psk",
    local_extra: str = "",
    remote_extra: str = "",
    connection_extra: str = "",
    child_extra: str = "",
    secrets_extra: str = "",
) -> str:
    """swanctl.conf of an IKEv2 road warrior (``version = 2``): PSK by default, a virtual IP
    from the gateway's pool (``vips = 0.0.0.0``), a tunnel to ``remote_ts``.  ``local_auth``
    and ``*_extra`` texts select certificates or EAP (e.g. ``local_auth="eap-mschapv2"``,
    ``local_extra="eap_id = alice\n"``)."""
    secret = f"  ike-1 {{\n    secret = {_quote(psk)}\n  }}\n" if psk is not None else ""
    return (
        "connections {\n"
        f"  {name} {{\n"
        "    version = 2\n"
        f"    proposals = {proposals}\n"
        f"    remote_addrs = {gateway}\n"
        + ("    vips = 0.0.0.0\n" if vips else "")
        + connection_extra
        + f"    local {{\n      auth = {local_auth}\n"
        f"      id = {_quote(local_id)}\n{local_extra}    }}\n"
        f"    remote {{\n      auth = {remote_auth}\n"
        f"      id = {_quote(remote_id)}\n{remote_extra}    }}\n"
        "    children {\n"
        f"      {child} {{\n"
        f"        remote_ts = {remote_ts}\n"
        f"        esp_proposals = {esp_proposals}\n"
        f"{child_extra}"
        "      }\n"
        "    }\n"
        "  }\n"
        "}\n"
        "secrets {\n"
        f"{secret}{secrets_extra}"
        "}\n"
    )
