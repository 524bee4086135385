"""`lossd serve --workers N`: N server processes on one port, one metrics endpoint for all.

One Python process answers a few thousand small RPCs per second; more processes scale that. Each
worker is a fresh interpreter (spawned, so it inherits no gRPC or CUDA state), binds the same port
with SO_REUSEPORT and runs its own batcher; on a GPU host all share the device. The parent holds
no gRPC server: it serves the workers' aggregated Prometheus metrics, restarts a worker that dies
(its device failed, it was killed), and passes SIGTERM / SIGINT on, then waits for every worker
to drain.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from lossd.server.config import ServerConfig

__all__ = ["run_workers"]

_LOGGER = logging.getLogger("lossd.server")
RESTART_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits before restarting a worker that died, by how often it died in a row (the last repeats).
A worker that ran for a minute starts the sequence over."""
_STABLE_S = 60.0


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host.strip("[]"), 0))
        return int(probe.getsockname()[1])


RunServer = Callable[..., int]
"""`run(config, worker=name)`: serves in this process until a signal; the exit status. The command
line passes its own (a module-level function, so that a spawned worker can import it)."""


def _worker_main(run: RunServer, config: ServerConfig, worker: str) -> None:
    """A worker process: the same setup as a single `lossd serve`."""
    raise SystemExit(run(config, worker=worker))


class _Slot:
    """One worker position ("2/4") and the process currently filling it."""

    def __init__(self, context: Any, run: RunServer, config: ServerConfig, index: int) -> None:
        self._context = context
        self._run = run
        self._config = config
        self.name = f"{index + 1}/{config.workers}"
        self.process: Any = None
        self.started = 0.0
        self.failures = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        self.process = self._context.Process(
            target=_worker_main, args=(self._run, self._config, self.name), name=f"lossd-worker-{self.name}"
        )
        self.process.start()
        self.started = time.monotonic()
        self.restart_at = None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


def run_workers(config: ServerConfig, run: RunServer) -> int:
    """Runs `config.workers` server processes until a signal; returns the exit status.

    A worker that exits while no signal asked it to (any status) is restarted after a delay that
    grows while it keeps dying (`RESTART_DELAYS_S`); its metrics files are retired first.
    """
    from prometheus_client import multiprocess

    from lossd.server.metrics import MULTIPROCESS_ENV, multiprocess_registry, serve_metrics

    port = config.port or _free_port(config.host)
    # The workers share the machine: each gets its share of the memory budget.
    config = dataclasses.replace(config, port=port, max_memory_bytes=config.memory_bytes // config.workers)
    config.check()
    metrics_dir = tempfile.mkdtemp(prefix="lossd-metrics-")
    os.environ[MULTIPROCESS_ENV] = metrics_dir  # inherited by the workers: record into shared files
    context = multiprocessing.get_context("spawn")
    slots = [_Slot(context, run, config, i) for i in range(config.workers)]
    stop_metrics = None
    stopping = threading.Event()

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        for slot in slots:
            if slot.alive():
                os.kill(slot.process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for slot in slots:
            slot.start()
        if config.metrics_port:
            stop_metrics = serve_metrics(multiprocess_registry(), config.host, config.metrics_port)
        _LOGGER.info(
            "lossd supervising %d workers on %s:%d (metrics on port %s)",
            config.workers,
            config.host,
            port,
            config.metrics_port or "off",
        )
        status = 0
        while True:
            running = False
            for slot in slots:
                process = slot.process
                if process is not None:
                    process.join(0.1)
                    if process.exitcode is None:
                        running = True
                        continue
                    slot.process = None
                    multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                    if stopping.is_set():
                        status = status or (1 if process.exitcode != 0 else 0)
                        continue
                    ran = time.monotonic() - slot.started
                    slot.failures = 1 if ran >= _STABLE_S else slot.failures + 1
                    delay = RESTART_DELAYS_S[min(slot.failures, len(RESTART_DELAYS_S)) - 1]
                    _LOGGER.error(
                        "worker %s (pid %s) exited with status %s after %.1f s; restarting it in %.1f s",
                        slot.name,
                        process.pid,
                        process.exitcode,
                        ran,
                        delay,
                    )
                    slot.restart_at = time.monotonic() + delay
                if slot.restart_at is not None and not stopping.is_set():
                    running = True
                    if time.monotonic() >= slot.restart_at:
                        slot.start()
            if not running:
                return status
            if all(slot.process is None for slot in slots):
                if stopping.is_set():
                    return status
                time.sleep(0.05)  # every worker is waiting to restart: nothing to join
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stop_metrics is not None:
            stop_metrics()
        shutil.rmtree(metrics_dir, ignore_errors=True)
