"""`lossd serve` as a child process, for tests of what only a real process shows: exit status,
signals, log lines."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    """A loopback port nothing listens on (for metrics ports and processes that need a number)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"


def pip_install(python: str) -> list[str]:
    """The command that installs into `python`'s environment, pinned by constraints.txt."""
    return [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", str(CONSTRAINTS)]


INJECTED = str(Path(__file__).with_name("injected_server.py"))
"""`python INJECTED [--delay S] [--poison] -- serve flags`: lossd serve with a fault-injecting engine."""


class ServeProcess:
    """A server process whose log is read by a thread as it comes (so that no line waits in a
    buffer that `select` cannot see)."""

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
        self._seen = 0
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # the end of the log
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first match of `pattern` in a log line not yet searched."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                while self._seen < len(self.lines):
                    line = self.lines[self._seen]
                    self._seen += 1
                    if line == "":
                        raise AssertionError(f"no {pattern!r} in the server's log:\n{''.join(self.lines)}")
                    found = re.search(pattern, line)
                    if found:
                        return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {pattern!r} in the server's log:\n{''.join(self.lines)}")
                self._changed.wait(remaining)

    def serving(self, timeout: float = 60) -> str:
        """Waits for the start-up line; the target to call (host:port)."""
        found = self.wait_for(r"serving lossd\.v1\.LossService on (\S+):(\d+) ", timeout)
        return f"{found.group(1)}:{found.group(2)}"

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        self.process.wait(timeout)
        self._reader.join(timeout)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return self.process.returncode, "".join(self.lines)


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
        item.finish()
