"""eBPF from Python without a compiler or libbpf: an instruction assembler and the bpf(2) calls.

The nar role keeps UDP ASSOCIATE datagrams in the kernel after the first of a flow
(:mod:`narsuite.nar.udpoffload`); that needs a small tc program, two hash maps and a
tcx link.  Nothing here knows about SOCKS: this module is the platform part.

* :class:`Asm` assembles instructions (named helpers for the opcodes used, labels
  resolved to jump offsets, map file descriptors as ``BPF_PSEUDO_MAP_FD`` loads);
* :func:`bpf` is the system call (libc ``syscall`` through ctypes); x86_64 only
  (its number differs per architecture; other machines get :class:`BpfUnavailable`);
* :class:`HashMap`, :class:`Program`, :class:`TcxLink` own one file descriptor each
  (``close()``); a tcx link detaches when its last descriptor closes, so a process
  killed with SIGKILL leaves nothing attached (no clsact qdisc, no pinning).

The constants are the kernel's uapi values (include/uapi/linux/bpf.h), checked against
the 6.1 header compiled here and upstream's enum order for the tcx ones.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterator
from typing import Self

__all__ = ["Asm", "BpfError", "BpfUnavailable", "HashMap", "Program", "TcxLink", "bpf", "available",
           "TCX_NEXT", "TC_ACT_OK", "TC_ACT_SHOT", "TC_ACT_REDIRECT", "SKB"]

# --- bpf(2) commands (enum bpf_cmd)
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
PROG_TEST_RUN = 10
MAP_LOOKUP_BATCH = 24
LINK_CREATE = 28

MAP_TYPE_HASH = 1
PROG_TYPE_SCHED_CLS = 3
ATTACH_TCX_INGRESS = 46  # enum bpf_attach_type: BPF_LSM_CGROUP 43, STRUCT_OPS 44, NETFILTER 45, TCX_INGRESS 46
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_F_NO_PREALLOC = 1

# tc / tcx verdicts
TCX_NEXT = -1  # TC_ACT_UNSPEC: the next tcx program, then the stack
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7

# --- helpers (enum bpf_func_id)
FN_map_lookup_elem = 1
FN_map_update_elem = 2
FN_ktime_get_ns = 5
FN_skb_store_bytes = 9
FN_redirect = 23
FN_csum_diff = 28
FN_skb_pull_data = 39
FN_skb_adjust_room = 50
FN_csum_level = 135
FN_redirect_neigh = 152

# helper flags
BPF_F_RECOMPUTE_CSUM = 1
BPF_F_INGRESS = 1
BPF_ADJ_ROOM_NET = 0
BPF_CSUM_LEVEL_RESET = 3

# --- struct __sk_buff field offsets
SKB = {"len": 0, "pkt_type": 4, "protocol": 16, "ingress_ifindex": 36, "ifindex": 40, "data": 76,
       "data_end": 80, "gso_segs": 164, "gso_size": 176}
SKB_SIZE = 192

# --- instruction encoding
_LD, _LDX, _ST, _STX, _ALU, _JMP, _JMP32, _ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
_W, _H, _B, _DW = 0x00, 0x08, 0x10, 0x18
_IMM, _MEM, _ATOMIC = 0x00, 0x60, 0xC0
_K, _X = 0x00, 0x08
_SIZES = {1: _B, 2: _H, 4: _W, 8: _DW}
_ALU_OPS = {"add": 0x00, "sub": 0x10, "mul": 0x20, "div": 0x30, "or": 0x40, "and": 0x50, "lsh": 0x60,
            "rsh": 0x70, "neg": 0x80, "mod": 0x90, "xor": 0xA0, "mov": 0xB0, "arsh": 0xC0}
_JMP_OPS = {"ja": 0x00, "eq": 0x10, "gt": 0x20, "ge": 0x30, "set": 0x40, "ne": 0x50, "sgt": 0x60,
            "sge": 0x70, "lt": 0xA0, "le": 0xB0, "slt": 0xC0, "sle": 0xD0}
_CALL, _EXIT, _END_BE = 0x80, 0x90, 0xD8
PSEUDO_MAP_FD = 1

# registers
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
FP = R10


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


class Asm:
    """An eBPF program being written: one method per kind of instruction, jumps to labels.

    ``jmp("eq", R0, 0, "miss")`` compares with an immediate, ``jmp("eq", R0, R1, "x", reg=True)``
    with a register; ``label("miss")`` places a label.  :meth:`assemble` resolves
    the labels (an unknown or duplicate label is a ``ValueError``) and returns the bytes.
    """

    def __init__(self) -> None:
        self._insns: list[bytes | tuple[int, int, int, int, str]] = []  # bytes or (code, dst, src, imm, label)
        self._labels: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._insns)

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name!r} placed twice")
        self._labels[name] = len(self._insns)

    # ALU
    def alu(self, op: str, dst: int, src_or_imm: int, *, reg: bool = False, bits: int = 64) -> None:
        cls = _ALU64 if bits == 64 else _ALU
        if reg:
            self._insns.append(_insn(cls | _ALU_OPS[op] | _X, dst, src_or_imm))
        else:
            self._insns.append(_insn(cls | _ALU_OPS[op] | _K, dst, 0, 0, src_or_imm))

    def mov(self, dst: int, src: int) -> None:
        """dst = src (registers)."""
        self.alu("mov", dst, src, reg=True)

    def movi(self, dst: int, imm: int) -> None:
        """dst = imm (sign-extended 32-bit)."""
        self.alu("mov", dst, imm)

    def be16(self, dst: int) -> None:
        """dst = htobe16(dst) (upper bits cleared): a byte swap on this little-endian host."""
        self._insns.append(_insn(_ALU | _END_BE, dst, 0, 0, 16))

    def ld_map(self, dst: int, map_fd: int) -> None:
        """dst = the map behind ``map_fd`` (a two-slot BPF_LD_IMM64 with BPF_PSEUDO_MAP_FD)."""
        self._insns.append(_insn(_LD | _DW | _IMM, dst, PSEUDO_MAP_FD, 0, map_fd))
        self._insns.append(_insn(0, 0, 0, 0, 0))

    # memory
    def ldx(self, size: int, dst: int, src: int, off: int) -> None:
        """dst = *(uSIZE *)(src + off)."""
        self._insns.append(_insn(_LDX | _MEM | _SIZES[size], dst, src, off))

    def stx(self, size: int, dst: int, off: int, src: int) -> None:
        """*(uSIZE *)(dst + off) = src."""
        self._insns.append(_insn(_STX | _MEM | _SIZES[size], dst, src, off))

    def st(self, size: int, dst: int, off: int, imm: int) -> None:
        """*(uSIZE *)(dst + off) = imm."""
        self._insns.append(_insn(_ST | _MEM | _SIZES[size], dst, 0, off, imm))

    def atomic_add(self, size: int, dst: int, off: int, src: int) -> None:
        """*(uSIZE *)(dst + off) += src, atomically (BPF_ATOMIC | BPF_ADD)."""
        self._insns.append(_insn(_STX | _ATOMIC | _SIZES[size], dst, src, off, 0x00))

    # control
    def jmp(self, op: str, dst: int, src_or_imm: int, label: str, *, reg: bool = False) -> None:
        if reg:
            self._insns.append((_JMP | _JMP_OPS[op] | _X, dst, src_or_imm, 0, label))
        else:
            self._insns.append((_JMP | _JMP_OPS[op] | _K, dst, 0, src_or_imm, label))

    def ja(self, label: str) -> None:
        self._insns.append((_JMP | _JMP_OPS["ja"], 0, 0, 0, label))

    def call(self, helper: int) -> None:
        self._insns.append(_insn(_JMP | _CALL, 0, 0, 0, helper))

    def exit(self) -> None:
        self._insns.append(_insn(_JMP | _EXIT))

    def ret(self, value: int) -> None:
        """r0 = value; exit."""
        self.movi(R0, value)
        self.exit()

    def assemble(self) -> bytes:
        out = []
        for i, ins in enumerate(self._insns):
            if isinstance(ins, bytes):
                out.append(ins)
                continue
            code, dst, src, imm, label = ins
            if label not in self._labels:
                raise ValueError(f"jump to unknown label {label!r}")
            out.append(_insn(code, dst, src, self._labels[label] - i - 1, imm))
        return b"".join(out)


# --- the system call

_NR_BPF = {"x86_64": 321}
_libc: ctypes.CDLL | None = None


class BpfError(OSError):
    """A bpf(2) call failed; ``errno`` as the kernel said, ``log`` the verifier's log for PROG_LOAD."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}" + (f"\n{log}" if log else ""))
        self.log = log


class BpfUnavailable(BpfError):
    """No bpf(2) here: another architecture (we know x86_64's syscall number only)."""


def _syscall_nr() -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfUnavailable(errno.ENOSYS, f"bpf(2) on {platform.machine()} (only x86_64 is known)")
    return nr


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    """bpf(cmd, attr, sizeof attr); the result, or :class:`BpfError` with errno."""
    global _libc
    nr = _syscall_nr()
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.syscall.restype = ctypes.c_long
    r = _libc.syscall(ctypes.c_long(nr), ctypes.c_long(cmd), attr, ctypes.c_long(len(attr)))
    if r < 0:
        raise BpfError(ctypes.get_errno(), what)
    return int(r)


def _attr(fields: bytes, size: int = 144) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(fields.ljust(size, b"\0"), size)


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


class _Fd:
    """A file descriptor owned by one object; ``close()`` is idempotent."""

    fd: int

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HashMap(_Fd):
    """A ``BPF_MAP_TYPE_HASH`` of fixed-size byte keys and values."""

    def __init__(self, key_size: int, value_size: int, max_entries: int, name: str = "") -> None:
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.fd = -1
        attr = struct.pack("<IIIII", MAP_TYPE_HASH, key_size, value_size, max_entries, BPF_F_NO_PREALLOC)
        attr += struct.pack("<II16s", 0, 0, name.encode()[:15])
        self.fd = bpf(MAP_CREATE, _attr(attr), "BPF_MAP_CREATE")
        self._batch_ok = True

    def _elem(self, cmd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None, flags: int,
              what: str) -> int:
        if len(key) != self.key_size:
            raise ValueError(f"key of {len(key)} bytes, the map's are {self.key_size}")
        k = ctypes.create_string_buffer(key, self.key_size)
        return bpf(cmd, _attr(struct.pack("<IIQQQ", self.fd, 0, _addr(k), _addr(value), flags)), what)

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self.value_size:
            raise ValueError(f"value of {len(value)} bytes, the map's are {self.value_size}")
        self._elem(MAP_UPDATE_ELEM, key, ctypes.create_string_buffer(value, self.value_size), flags,
                   "BPF_MAP_UPDATE_ELEM")

    def lookup(self, key: bytes) -> bytes | None:
        v = ctypes.create_string_buffer(self.value_size)
        try:
            self._elem(MAP_LOOKUP_ELEM, key, v, 0, "BPF_MAP_LOOKUP_ELEM")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return v.raw

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it was not there."""
        try:
            self._elem(MAP_DELETE_ELEM, key, None, 0, "BPF_MAP_DELETE_ELEM")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> Iterator[bytes]:
        """Every key (BPF_MAP_GET_NEXT_KEY); entries added or removed meanwhile may or may not show."""
        k = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        attr = _attr(struct.pack("<IIQQ", self.fd, 0, 0, _addr(nxt)))
        while True:
            try:
                bpf(MAP_GET_NEXT_KEY, attr, "BPF_MAP_GET_NEXT_KEY")
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            key = nxt.raw
            yield key
            ctypes.memmove(k, key, self.key_size)
            attr = _attr(struct.pack("<IIQQ", self.fd, 0, _addr(k), _addr(nxt)))

    def items(self, chunk: int = 4096) -> list[tuple[bytes, bytes]]:
        """Every (key, value), by BPF_MAP_LOOKUP_BATCH (one call per ``chunk`` entries); on
        kernels without it, by GET_NEXT_KEY and LOOKUP_ELEM."""
        if self._batch_ok:
            try:
                return self._items_batch(chunk)
            except BpfError as e:
                if e.errno not in (errno.EINVAL, errno.ENOTSUPP if hasattr(errno, "ENOTSUPP") else 524,
                                   524, errno.ENOSYS):
                    raise
                self._batch_ok = False
        out = []
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                out.append((k, v))
        return out

    def _items_batch(self, chunk: int) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        # a hash map's batch token is a bucket index (4 bytes)
        token_in = ctypes.create_string_buffer(8)
        token_out = ctypes.create_string_buffer(8)
        keys = ctypes.create_string_buffer(self.key_size * chunk)
        values = ctypes.create_string_buffer(self.value_size * chunk)
        first = True
        while True:
            attr = _attr(struct.pack("<QQQQIIQQ", 0 if first else _addr(token_in), _addr(token_out),
                                     _addr(keys), _addr(values), chunk, self.fd, 0, 0))
            done = False
            try:
                bpf(MAP_LOOKUP_BATCH, attr, "BPF_MAP_LOOKUP_BATCH")
            except BpfError as e:
                if e.errno != errno.ENOENT:
                    raise
                done = True  # the last batch (possibly with entries)
            count = struct.unpack_from("<I", attr.raw, 32)[0]
            kr, vr = keys.raw, values.raw
            ks, vs = self.key_size, self.value_size
            out.extend((kr[i * ks:(i + 1) * ks], vr[i * vs:(i + 1) * vs]) for i in range(count))
            if done:
                return out
            ctypes.memmove(token_in, token_out, 8)
            first = False


class Program(_Fd):
    """A loaded program; ``BpfError.log`` holds the verifier's reasons when loading fails."""

    def __init__(self, insns: bytes, prog_type: int = PROG_TYPE_SCHED_CLS, name: str = "",
                 license: str = "GPL", log_size: int = 1 << 20) -> None:
        self.fd = -1
        code = ctypes.create_string_buffer(insns, len(insns))
        lic = ctypes.create_string_buffer(license.encode())
        for level in (0, 1):  # the log only when loading failed: the kernel then says why
            logbuf = ctypes.create_string_buffer(log_size if level else 1)
            attr = struct.pack("<IIQQIIQII16s", prog_type, len(insns) // 8, _addr(code), _addr(lic),
                               level, log_size if level else 0, _addr(logbuf) if level else 0, 0, 0,
                               name.encode()[:15])
            try:
                self.fd = bpf(PROG_LOAD, _attr(attr), "BPF_PROG_LOAD")
                return
            except BpfError as e:
                if level or e.errno in (errno.EPERM, errno.ENOSYS):
                    raise BpfError(e.errno or errno.EINVAL, "BPF_PROG_LOAD",
                                   logbuf.value.decode(errors="replace")[-4000:] if level else "") from None

    def test_run(self, data: bytes, ctx: bytes | None = None, repeat: int = 1) -> tuple[int, bytes]:
        """BPF_PROG_TEST_RUN on a copy of ``data`` (an Ethernet frame for tc programs):
        (the program's return value, the packet as the program left it)."""
        din = ctypes.create_string_buffer(data, len(data))
        size_out = len(data) + 256
        dout = ctypes.create_string_buffer(size_out)
        c = ctypes.create_string_buffer(ctx, len(ctx)) if ctx is not None else None
        attr = _attr(struct.pack("<IIIIQQIIIIQQII", self.fd, 0, len(data), size_out, _addr(din), _addr(dout),
                                 repeat, 0, len(ctx) if ctx else 0, 0, _addr(c), 0, 0, 0))
        bpf(PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
        retval, = struct.unpack_from("<i", attr.raw, 4)
        n, = struct.unpack_from("<I", attr.raw, 12)
        return retval, dout.raw[:n]


class TcxLink(_Fd):
    """A tc program on an interface's ingress through a tcx link (BPF_LINK_CREATE, Linux 6.6+).

    Appended after the programs already there; detached when ``close()``d or when the
    process dies (the kernel drops the link with its last descriptor)."""

    def __init__(self, program: Program, ifindex: int, attach_type: int = ATTACH_TCX_INGRESS) -> None:
        self.fd = -1
        self.ifindex = ifindex
        attr = struct.pack("<IIII", program.fd, ifindex, attach_type, 0)
        self.fd = bpf(LINK_CREATE, _attr(attr), "BPF_LINK_CREATE(tcx)")


def available() -> str | None:
    """None when programs can be loaded here, else why not (one line)."""
    try:
        a = Asm()
        a.ret(TCX_NEXT)
        Program(a.assemble(), name="narsuite_probe").close()
    except BpfError as e:
        return str(e).splitlines()[0]
    return None
