"""Server settings: one frozen dataclass; each field is a `--flag` and a `LOSSD_*` environment variable.

Precedence: command-line flag, then environment variable, then the default below.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lossd.client.codec import TensorLimits

__all__ = ["ENV_PREFIX", "ServerConfig"]

ENV_PREFIX = "LOSSD_"
_PROTOBUF_MAX = 2**31 - 1  # protobuf cannot parse a message of 2 GiB or more


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help, "type": type(default)})


@dataclass(frozen=True)
class ServerConfig:
    """Everything `lossd serve` can be told."""

    host: str = _setting("[::]", "address to bind; [::] is every interface, IPv4 and IPv6")
    port: int = _setting(50051, "gRPC port; 0 picks a free one")
    device: str = _setting("auto", "torch device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    max_message_bytes: int = _setting(_PROTOBUF_MAX, "largest gRPC message received or sent, in bytes")
    max_tensor_elements: int = _setting(2**31 - 1, "most elements in one request tensor")
    max_tensor_bytes: int = _setting(_PROTOBUF_MAX, "most data bytes in one request tensor")
    max_tensor_dims: int = _setting(32, "most dimensions of one request tensor")
    shutdown_grace_s: float = _setting(10.0, "seconds in-flight calls get to finish on SIGTERM / SIGINT")
    log_level: str = _setting("INFO", "logging level: DEBUG, INFO, WARNING or ERROR")

    @property
    def limits(self) -> TensorLimits:
        """The per-tensor limits the codec enforces on requests."""
        return TensorLimits(self.max_tensor_elements, self.max_tensor_bytes, self.max_tensor_dims)

    @property
    def address(self) -> str:
        """host:port as gRPC binds it."""
        return f"{self.host}:{self.port}"

    @staticmethod
    def env_name(name: str) -> str:
        """The environment variable of a field: LOSSD_MAX_MESSAGE_BYTES for max_message_bytes."""
        return ENV_PREFIX + name.upper()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Adds one `--flag` per field; unset flags stay None so that the environment can apply."""
        for spec in dataclasses.fields(cls):
            parser.add_argument(
                "--" + spec.name.replace("_", "-"),
                type=spec.metadata["type"],
                default=None,
                metavar=spec.name.upper(),
                help=f"{spec.metadata['help']} (env {cls.env_name(spec.name)}, default {spec.default})",
            )

    @classmethod
    def load(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] = os.environ
    ) -> ServerConfig:
        """Flags over environment over defaults; a ValueError names the bad variable."""
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            flag = getattr(args, spec.name, None) if args is not None else None
            if flag is not None:
                values[spec.name] = flag
                continue
            env = environ.get(cls.env_name(spec.name))
            if env is not None:
                try:
                    values[spec.name] = spec.metadata["type"](env)
                except ValueError:
                    raise ValueError(
                        f"{cls.env_name(spec.name)}={env!r} is not a valid {spec.metadata['type'].__name__}"
                    ) from None
        return cls(**values)

    @classmethod
    def parse(cls, argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> ServerConfig:
        """The config for `lossd serve` arguments (without the subcommand)."""
        parser = argparse.ArgumentParser(prog="lossd serve")
        cls.add_arguments(parser)
        return cls.load(parser.parse_args(argv), environ)
