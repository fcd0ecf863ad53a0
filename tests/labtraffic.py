"""Traffic for the lab tests: ping and a one-way TCP transfer between two lab hosts.

Shared by the esp and ike lab tests, which push the same kinds of traffic through the
gateway's tunnels.
"""

from __future__ import annotations

import sys
import textwrap

__all__ = ["ping", "tcp_transfer"]


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
