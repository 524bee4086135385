"""`lossd serve --workers N`: N server processes on one port, one metrics endpoint for all.

One Python process answers a few thousand small RPCs per second; more processes scale that. Each
worker is a fresh interpreter (spawned, so it inherits no gRPC or CUDA state), binds the same port
with SO_REUSEPORT and runs its own batcher; on a GPU host all share the device. The parent holds
no gRPC server: it serves the workers' aggregated Prometheus metrics and passes SIGTERM / SIGINT
on, then waits for every worker to drain.
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
from types import FrameType

from lossd.server.config import ServerConfig

__all__ = ["run_workers"]

_LOGGER = logging.getLogger("lossd.server")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host.strip("[]"), 0))
        return int(probe.getsockname()[1])


def _worker_main(config: ServerConfig, worker: str) -> None:
    """A worker process: the same setup as a single `lossd serve`."""
    from lossd.server.cli import run_server

    raise SystemExit(run_server(config, worker=worker))


def run_workers(config: ServerConfig) -> int:
    """Runs `config.workers` server processes until a signal; returns the exit status."""
    from prometheus_client import multiprocess

    from lossd.server.metrics import MULTIPROCESS_ENV, multiprocess_registry, serve_metrics

    port = config.port or _free_port(config.host)
    config = dataclasses.replace(config, port=port)
    metrics_dir = tempfile.mkdtemp(prefix="lossd-metrics-")
    os.environ[MULTIPROCESS_ENV] = metrics_dir  # inherited by the workers: record into shared files
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_worker_main, args=(config, f"{i + 1}/{config.workers}"), name=f"lossd-worker-{i + 1}"
        )
        for i in range(config.workers)
    ]
    stop_metrics = None
    stopping = threading.Event()

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for process in processes:
            process.start()
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
        pending = list(processes)
        while pending:
            for process in list(pending):
                process.join(0.2)
                if process.exitcode is None:
                    continue
                pending.remove(process)
                multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                if process.exitcode != 0:
                    status = 1
                    if not stopping.is_set():  # a worker died on its own: take the rest down too
                        _LOGGER.error("%s exited with status %s; stopping", process.name, process.exitcode)
                        forward(signal.SIGTERM, None)
        return status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stop_metrics is not None:
            stop_metrics()
        shutil.rmtree(metrics_dir, ignore_errors=True)
