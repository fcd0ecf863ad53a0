"""Traffic for the lab tests: ping, a one-way TCP transfer between two lab hosts, and
tshark over what was captured.

Shared by the esp and ike lab tests, which push the same kinds of traffic through the
gateway's tunnels.
"""

from __future__ import annotations

import sys
import textwrap

__all__ = ["ping", "tcp_transfer", "tshark_ipsec"]


def ping(host, dst: str, count: int = 3) -> bool:
    out = host.run(["ping", "-c", str(count), "-i", "0.2", "-W", "2", dst], check=False, timeout=30)
    return out.returncode == 0


def tcp_transfer(server_host, client_host, server_ip: str, size: int = 300_000) -> int:
    """Send ``size`` bytes from a server on ``server_host`` to a client; return bytes received."""
    server = server_host.popen([sys.executable, "-c", textwrap.dedent(f"""
        import socket
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 5001)); s.listen(1)
        c, _ = s.accept(); c.sendall(bytes(range(256)) * ({size} // 256)); c.close()
        """)])
    try:
        server_host.wait_port(5001)
        out = client_host.run([sys.executable, "-c", textwrap.dedent(f"""
            import socket
            s = socket.create_connection(("{server_ip}", 5001), timeout=20)
            n = 0
            while True:
                b = s.recv(65536)
                if not b: break
                n += len(b)
            print(n)
            """)], timeout=60)
        return int(out.stdout.strip())
    finally:
        server_host.stop(server)


# What Wireshark should read on the far side of a datagram to or from these ports.
_IPSEC_PORTS = {500: "isakmp", 4500: "udpencap"}


def tshark_ipsec(host, pcap, *fields: str) -> str:
    """``tshark -T fields`` over an IKE/ESP capture, with the NAT's ports decoded as what they carry.

    tshark picks a UDP dissector by the lower of the two ports.  A NAT maps a client's
    port 500 to some other port below 512 (Linux keeps a port's class), and that port
    may belong to another protocol: 434 is Mobile IP, and tshark then calls our IKE
    "malformed Mobile IP".  Every port seen talking to 500 or 4500 is therefore decoded
    as ISAKMP or UDP-encapsulation, the way a real dissector reads the conversation.
    """
    pairs = host.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "udp.srcport",
                      "-e", "udp.dstport"]).stdout.split("\n")
    decode: dict[int, str] = {}
    for line in pairs:
        ports = [int(p) for p in line.split() if p.isdigit()]
        if len(ports) != 2:
            continue
        for mine, other in (ports, ports[::-1]):
            if mine in _IPSEC_PORTS and other not in _IPSEC_PORTS:
                decode.setdefault(other, _IPSEC_PORTS[mine])
    argv = ["tshark", "-r", str(pcap)]
    for port, proto in sorted(decode.items()):
        argv += ["-d", f"udp.port=={port},{proto}"]
    argv += ["-T", "fields"]
    for field in fields:
        argv += ["-e", field]
    return host.run(argv).stdout
