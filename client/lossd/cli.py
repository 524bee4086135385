"""The `lossd` command: `lossd serve [flags]` runs the server, `lossd health [flags]` checks one
(see `--help` of each).

Installed with the client, so that `lossd health` works without the server's packages; `lossd serve`
imports the server only when it runs. The one module that imports `lossd.server.app`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lossd.wire.version import __version__

if TYPE_CHECKING:
    from lossd.server.config import ServerConfig

__all__ = ["main"]

SERVER_MODULES = ("torch", "prometheus_client", "grpc_health", "grpc_reflection")
"""What `lossd serve` imports beyond the client's dependencies (the `server` extra)."""


def _parser() -> argparse.ArgumentParser:
    from lossd.client import health
    from lossd.server.config import ServerConfig

    parser = argparse.ArgumentParser(prog="lossd", description="lossd: PyTorch losses over gRPC.")
    parser.add_argument("--version", action="version", version=f"lossd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    ServerConfig.add_arguments(serve)
    health_parser = commands.add_parser(
        "health", help="exit 0 if a server's gRPC health check answers SERVING, else 1"
    )
    health.add_arguments(health_parser)
    return parser


def configure(config: ServerConfig) -> None:
    """Logging and warnings as `lossd serve` sets them up."""
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # torch warns on every kl_div with reduction='mean' (its default); lossd computes it faithfully.
    warnings.filterwarnings(
        "ignore", message="reduction: 'mean' divides the total loss", category=UserWarning
    )
    # The server decodes request tensors as read-only views of the received bytes (no copy) and never
    # writes to them: torch's notice about non-writable memory is noise in this process.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def run_server(config: ServerConfig, *, worker: str = "") -> int:
    """Serves in this process until a signal; the exit status."""
    from lossd.server.app import serve

    configure(config)
    try:
        return asyncio.run(serve(config, worker=worker))
    except (OSError, ValueError) as exc:
        logging.getLogger("lossd.server").error("cannot serve: %s", exc)
        return 1


INSTALL_HINT = (
    "from a checkout, scripts/serve sets them up and serves (or: pip install -c constraints.txt "
    "'.[server]'); from a built wheel: pip install 'lossd-<version>-py3-none-any.whl[server]'"
)
"""How to get the server's packages: lossd is installed from a checkout or a wheel, not an index."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lossd` console script."""
    try:
        from lossd.server.config import ServerConfig
        from lossd.server.workers import run_workers
    except ImportError as exc:  # the client-only install
        print(f"lossd: the server's packages are not installed ({exc}); {INSTALL_HINT}", file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    if args.command == "health":
        from lossd.client import health

        return health.check(args)
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:  # the client-only install: `lossd health` works, `lossd serve` needs the extra
        print(
            f"lossd serve needs the server's packages ({', '.join(missing)} missing); {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    try:
        config = ServerConfig.load(args)
    except ValueError as exc:
        print(f"lossd: {exc}", file=sys.stderr)
        return 2
    if config.workers > 1:
        configure(config)
        return run_workers(config, run_server)
    if not config.metrics_port or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return run_server(config)
    # Metrics from another process: a scrape flood must not take the gRPC port's CPU or GIL. The
    # files this process records into must be named before prometheus_client is first imported.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="lossd-metrics-")
    from lossd.server.metrics import start_exporter

    configure(config)
    try:
        stop_exporter = start_exporter(config.host, config.metrics_port)
    except OSError as exc:
        logging.getLogger("lossd.server").error("cannot serve: %s", exc)
        return 1
    try:
        return run_server(config)
    finally:
        stop_exporter()


if __name__ == "__main__":
    sys.exit(main())
