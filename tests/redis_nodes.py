"""Drive tests/store_node.py processes: the nodes of the shared-store tests."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class NodeProc:
    """One store node process; ``call`` runs a command and returns its result."""

    def __init__(self, node_id: str, store_toml: str, *, heartbeat: tuple[float, float] = (0.2, 0.6)) -> None:
        self.node_id = node_id
        self.dir = Path(tempfile.mkdtemp(prefix=f"narsuite-node-{node_id}-"))
        self.config = self.dir / "node.toml"
        self.config.write_text(store_toml + f'\n[cluster]\nnode_id = "{node_id}"\n'
                               f"heartbeat_interval = {heartbeat[0]}\nheartbeat_timeout = {heartbeat[1]}\n")
        self.proc: subprocess.Popen | None = None
        self.events: list[dict] = []
        self.replies: dict[int, dict] = {}
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)

    def start(self, timeout: float = 20.0) -> NodeProc:
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        self.events, self.replies = [], {}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "store_node.py"), "--config", str(self.config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env)
        threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True).start()
        self.wait_event(lambda e: e.get("event") == "ready", timeout, "ready")
        return self

    def _pump(self, f, is_out: bool) -> None:  # type: ignore[no-untyped-def]
        for line in f:
            if not is_out:
                self.stderr.append(line.decode(errors="replace"))
                continue
            msg = json.loads(line)
            with self._cond:
                if "id" in msg:
                    self.replies[msg["id"]] = msg
                else:
                    self.events.append(msg)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "eof"})
            self._cond.notify_all()

    def send(self, op: str, **args) -> int:  # type: ignore[no-untyped-def]
        i = next(self._ids)
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"id": i, "op": op, "args": args}) + "\n").encode())
        self.proc.stdin.flush()
        return i

    def reply(self, i: int, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while i not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0 or (self.events and self.events[-1].get("event") == "eof"):
                    raise AssertionError(f"{self.node_id}: no answer to #{i}; stderr={''.join(self.stderr)[-3000:]}")
                self._cond.wait(left)
            return self.replies.pop(i)

    def call(self, op: str, timeout: float = 60.0, **args):  # type: ignore[no-untyped-def]
        r = self.reply(self.send(op, **args), timeout)
        if not r["ok"]:
            raise NodeError(r["error"])
        return r["result"]

    def try_call(self, op: str, timeout: float = 60.0, **args) -> dict:  # type: ignore[no-untyped-def]
        return self.reply(self.send(op, **args), timeout)

    def wait_event(self, pred, timeout: float, what: str) -> dict:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or (self.events and self.events[-1].get("event") == "eof"):
                    raise AssertionError(f"{self.node_id}: no {what}; stderr={''.join(self.stderr)[-3000:]}")
                self._cond.wait(left)

    def until(self, pred, timeout: float = 5.0, what: str = "condition", interval: float = 0.02):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.node_id}: {what} not reached in {timeout}s")
            time.sleep(interval)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(5)
            except Exception:
                self.kill()
        self.kill()


class NodeError(Exception):
    pass
