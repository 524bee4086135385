"""`lossd serve` as a child process, for tests of what only a real process shows: exit status,
signals, log lines."""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    """A loopback port nothing listens on (for metrics ports and processes that need a number)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


INJECTED = str(Path(__file__).with_name("injected_server.py"))
"""`python INJECTED [--delay S] [--poison] -- serve flags`: lossd serve with a fault-injecting engine."""


class ServeProcess:
    def __init__(
        self, *args: str, env: dict[str, str] | None = None, command: list[str] | None = None
    ) -> None:
        self.process = subprocess.Popen(
            [*(command or [sys.executable, "-m", "lossd.server", "serve"]), *args],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        assert self.process.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stderr], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                break
            line = self.process.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(pattern, line)
            if found:
                return found
        raise AssertionError(f"no {pattern!r} in the server's log:\n{''.join(self.lines)}")

    def serving(self, timeout: float = 60) -> str:
        """Waits for the start-up line; the target to call (host:port)."""
        found = self.wait_for(r"serving lossd\.v1\.LossService on (\S+):(\d+) ", timeout)
        return f"{found.group(1)}:{found.group(2)}"

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        _, rest = self.process.communicate(timeout=timeout)
        return self.process.returncode, "".join(self.lines) + rest


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(
        *args: str, env: dict[str, str] | None = None, command: list[str] | None = None
    ) -> ServeProcess:
        started.append(ServeProcess(*args, env=env, command=command))
        return started[-1]

    yield start
    for item in started:
        if item.process.poll() is None:
            item.process.kill()
            item.process.wait()
