"""lossd servers in child processes, for the soak and fault benchmarks."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence

__all__ = ["LossdProcess", "free_port", "reset_peak_rss", "rss", "scrape"]


def rss(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory (`VmRSS`) or its peak since the last reset (`VmHWM`), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def reset_peak_rss(pid: int) -> bool:
    """Resets a process's VmHWM to its current RSS; False where the kernel does not allow it."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LossdProcess:
    """`lossd serve` on 127.0.0.1 with a fresh port and metrics port; its log is kept, not piped
    to a full buffer."""

    def __init__(self, args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        command = [
            sys.executable,
            "-m",
            "lossd.server",
            "serve",
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--metrics-port={self.metrics_port}",
            *args,
        ]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(180):
            self.kill()
            raise RuntimeError("lossd did not start:\n" + "".join(self.log))
        self.target = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if re.search(r"serving lossd\.v1\.LossService", line):
                self._ready.set()

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye (a crashed or evicted replica)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> int:
        """SIGTERM and wait for the drain; the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(60)


def scrape(metrics_port: int, name: str) -> float:
    """The sum of one metric's samples (all labels) from a server's /metrics."""
    deadline = time.monotonic() + 10
    while True:
        try:
            text = (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            )
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total
