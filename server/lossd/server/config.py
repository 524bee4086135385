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

from lossd.wire.codec import TensorLimits

__all__ = ["ENV_PREFIX", "ServerConfig"]

ENV_PREFIX = "LOSSD_"
_PROTOBUF_MAX = 2**31 - 1  # protobuf cannot parse a message of 2 GiB or more


def _on_off(text: str) -> bool:
    """'on' / 'off' (also true/false, yes/no, 1/0), as flags and environment variables spell switches."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{text!r} is not on or off")


_on_off.__name__ = "on/off"


def _setting(default: Any, help: str, *, secret: bool = False) -> Any:
    """A field; a `secret` one has no flag (command lines are visible to every local user) and is
    never shown."""
    parse = _on_off if isinstance(default, bool) else type(default)
    return field(default=default, repr=not secret, metadata={"help": help, "type": parse, "secret": secret})


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value) if value != "" else "unset"


RECEIVE_WINDOW = 64 * 1024
"""HTTP/2 bytes a client may send on one call before lossd reads it (gRPC's lookahead, with its
window probing off): what a call costs before it is admitted."""
CONNECTION_OVERHEAD = 256 * 1024
"""What gRPC holds per open connection besides its calls' windows (buffers, HPACK tables), about."""


def machine_memory() -> int:
    """The memory this process may use: the machine's physical memory, or the container's cgroup
    limit when that is lower."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as file:
                text = file.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:
            return int(text)
    return physical


def half_memory() -> int:
    """Half of the memory this process may use."""
    return machine_memory() // 2


@dataclass(frozen=True)
class ServerConfig:
    """Everything `lossd serve` can be told."""

    host: str = _setting("[::]", "address to bind; [::] is every interface, IPv4 and IPv6")
    port: int = _setting(50051, "gRPC port; 0 picks a free one")
    device: str = _setting("auto", "torch device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    max_message_bytes: int = _setting(
        8 * 2**20,
        "largest gRPC message received or sent, in bytes (lossd's client streams calls over 4 MiB; "
        "raise it for large unary calls, up to 2147483647)",
    )
    max_tensor_elements: int = _setting(2**34, "most elements in one request tensor")
    max_tensor_bytes: int = _setting(
        0,
        "most bytes in one tensor of a request, or of a loss it broadcasts to (StreamLoss passes 2 GiB); "
        "0: what one client may hold of max_memory_bytes",
    )
    max_tensor_dims: int = _setting(32, "most dimensions of one request tensor")
    shutdown_grace_s: float = _setting(10.0, "seconds in-flight calls get to finish on SIGTERM / SIGINT")
    max_request_s: float = _setting(
        600.0,
        "longest a call may take inside the server (receiving, queueing, computing, sending) before it "
        "fails DEADLINE_EXCEEDED; the caller's own deadline applies too; 0: no server limit",
    )
    max_connection_age_s: float = _setting(
        300.0,
        "seconds after which a client connection is asked to reconnect (calls in progress finish "
        "first), so that clients balancing over DNS find new replicas; 0: never",
    )
    max_concurrent_streams: int = _setting(
        128,
        "most calls in progress at once on one client connection (HTTP/2 streams); more are refused "
        "UNAVAILABLE before any work (lossd's client retries them)",
    )
    max_memory_bytes: int = _setting(
        0,
        "memory budget for everything held for calls not yet answered (messages being received, "
        "stream buffers, computation temporaries, answers not yet read, and what unadmitted "
        "connections may buffer); one client connection may hold half; 0: a quarter of this "
        "machine's (or container's) memory",
    )
    max_connections: int = _setting(
        0,
        "most client connections at once (each may buffer max_concurrent_streams x 64 KiB before lossd "
        "reads a call); 0: as many as fit in a quarter of max_memory_bytes",
    )
    idle_timeout_s: float = _setting(
        10.0,
        "seconds a call may go without sending its next message, or without reading lossd's answer, "
        "before it fails DEADLINE_EXCEEDED and its memory is freed; 0: none",
    )
    admission_wait_s: float = _setting(
        5.0, "longest a call waits for memory under max_memory_bytes before RESOURCE_EXHAUSTED"
    )
    reject_nonfinite: bool = _setting(
        False,
        "refuse requests whose tensors hold NaN or infinity (INVALID_ARGUMENT); off: compute as torch does",
    )
    max_resident_bytes: int = _setting(
        0,
        "most bytes of tensors held for requests (PutTensor), in host memory besides max_memory_bytes; "
        "0: a quarter of max_memory_bytes",
    )
    resident_policy: str = _setting(
        "lru",
        "when an upload would pass max_resident_bytes: lru (let the least recently used tensors go; a "
        "call naming one gets NOT_FOUND and lossd's client uploads it again) or refuse (RESOURCE_EXHAUSTED)",
    )
    max_batch_entries: int = _setting(
        1024, "most entries in one ComputeLossBatch call (more: RESOURCE_EXHAUSTED, BATCH_TOO_LARGE)"
    )
    stream_chunk_bytes: int = _setting(2**20, "bytes per StreamLoss response chunk")
    stream_block_bytes: int = _setting(
        8 * 2**20, "input bytes per block a StreamLoss call is computed in while its input still arrives"
    )
    batching: bool = _setting(True, "merge concurrent compatible requests into one computation: on or off")
    max_batch_rows: int = _setting(16384, "most rows (samples x positions) in one merged computation")
    max_batch_bytes: int = _setting(64 * 2**20, "most request tensor bytes in one merged computation")
    max_queue_delay_us: int = _setting(
        0, "microseconds the oldest queued request may wait for others to join its batch; 0: none"
    )
    max_queue_size: int = _setting(4096, "most requests waiting for compute; beyond it RESOURCE_EXHAUSTED")
    fair_slice_us: int = _setting(
        500,
        "microseconds of estimated compute one computation takes at most while tenants share the queue: "
        "what one tenant's small call waits behind another's flood (larger: more throughput for floods)",
    )
    workers: int = _setting(1, "server processes sharing the port (and the device)")
    device_memory_fraction: float = _setting(
        0.0,
        "share of the CUDA device's memory this process may allocate (torch's per-process cap); 0: "
        "1/workers with several workers, else no cap",
    )
    open_inference: bool = _setting(
        True, "also serve the Open Inference Protocol (KServe v2: inference.GRPCInferenceService): on or off"
    )
    torch_threads: int = _setting(
        0,
        "torch intra-op threads for large computations (small ones use one); 0: every core but one on "
        "the CPU, one with CUDA",
    )
    metrics_port: int = _setting(9464, "Prometheus metrics HTTP port; 0 turns metrics off")
    log_level: str = _setting("INFO", "logging level: DEBUG, INFO, WARNING or ERROR")
    tls_cert_file: str = _setting("", "PEM server certificate (chain): serve TLS instead of plaintext")
    tls_key_file: str = _setting("", "PEM private key of the server certificate")
    tls_client_ca_file: str = _setting(
        "", "PEM CA bundle: require every client to present a certificate it signed (mutual TLS)"
    )
    auth_token_file: str = _setting(
        "", "file of accepted bearer tokens, one per line: calls without one fail UNAUTHENTICATED"
    )
    auth_token: str = _setting(
        "", "an accepted bearer token (environment only, never a flag: command lines are public)", secret=True
    )
    tenants_file: str = _setting(
        "",
        "TOML file of tenants: each one's token digests or client-certificate subjects, weight and quotas "
        "(see docs/tenants.md); reloaded when it changes and on SIGHUP",
    )
    max_call_cost: float = _setting(
        0.0,
        "most estimated FLOPs one loss call (or batch entry) may cost; above it RESOURCE_EXHAUSTED "
        "(CALL_TOO_COSTLY) before any compute; 0: no limit",
    )
    health_without_auth: bool = _setting(
        True, "answer health checks without a token, so that load balancers and kubelets can probe"
    )

    @property
    def limits(self) -> TensorLimits:
        """The per-tensor limits the codec enforces on requests."""
        return TensorLimits(
            self.max_tensor_elements, self.max_tensor_bytes or self.memory_bytes // 2, self.max_tensor_dims
        )

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
            if spec.metadata["secret"]:
                continue
            # A switch given alone turns it on: `--reject-nonfinite` is `--reject-nonfinite on`.
            switch: dict[str, Any] = {"nargs": "?", "const": True} if spec.metadata["type"] is _on_off else {}
            parser.add_argument(
                "--" + spec.name.replace("_", "-"),
                type=spec.metadata["type"],
                default=None,
                **switch,
                metavar=spec.name.upper(),
                help=f"{spec.metadata['help']} (env {cls.env_name(spec.name)}, "
                f"default {_shown(spec.default)})",
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
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Rejects settings that cannot work, naming the setting."""
        positive = (
            "max_message_bytes",
            "max_tensor_elements",
            "max_tensor_dims",
            "max_batch_rows",
            "max_batch_bytes",
            "max_queue_size",
            "fair_slice_us",
            "max_concurrent_streams",
            "workers",
        )
        if self.max_message_bytes > _PROTOBUF_MAX:
            raise ValueError(f"max_message_bytes must be at most {_PROTOBUF_MAX} (protobuf's limit)")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        non_negative = (  # 0 means none, off, any port, or a default worked out at start-up
            "max_queue_delay_us",
            "port",
            "metrics_port",
            "shutdown_grace_s",
            "torch_threads",
            "max_request_s",
            "max_connection_age_s",
            "max_memory_bytes",
            "max_connections",
            "idle_timeout_s",
            "admission_wait_s",
            "max_tensor_bytes",
            "max_resident_bytes",
            "max_batch_entries",
            "max_call_cost",
        )
        if self.resident_policy not in ("lru", "refuse"):
            raise ValueError(f"resident_policy must be lru or refuse, got {self.resident_policy!r}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.device_memory_fraction <= 1.0:
            raise ValueError(f"device_memory_fraction must be in [0, 1], got {self.device_memory_fraction}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.admitted_bytes < 4 * self.max_message_bytes:
            raise ValueError(
                f"max_memory_bytes {self.memory_bytes} leaves {self.admitted_bytes} bytes for calls after "
                f"{self.connections} connections x {self.stream_bytes_per_connection} bytes each "
                f"(max_connections x max_concurrent_streams); it must cover 4 x max_message_bytes "
                f"({self.max_message_bytes}): raise max_memory_bytes or lower the others"
            )

    @property
    def resident_bytes(self) -> int:
        """`max_resident_bytes`, with 0 resolved to a quarter of `memory_bytes`."""
        return self.max_resident_bytes or self.memory_bytes // 4

    @property
    def memory_bytes(self) -> int:
        """`max_memory_bytes`, with 0 resolved to a quarter of the machine's (container's) memory."""
        return self.max_memory_bytes or machine_memory() // 4

    @property
    def stream_bytes_per_connection(self) -> int:
        """What one connection may make gRPC buffer before lossd admits any of its calls."""
        return self.max_concurrent_streams * RECEIVE_WINDOW + CONNECTION_OVERHEAD

    @property
    def connections(self) -> int:
        """`max_connections`, with 0 resolved to as many as a quarter of the budget covers (at least 4)."""
        if self.max_connections:
            return self.max_connections
        return max(4, self.memory_bytes // 4 // self.stream_bytes_per_connection)

    @property
    def device_memory_share(self) -> float:
        """The share of the device's memory this process may take (0: no cap): as set, or an even
        share among the workers, whose allocator caches would otherwise push each other out of
        memory."""
        if self.device_memory_fraction:
            return self.device_memory_fraction
        return 1.0 / self.workers if self.workers > 1 else 0.0

    @property
    def admitted_bytes(self) -> int:
        """The budget for admitted calls: `memory_bytes` less what unadmitted connections may buffer."""
        return self.memory_bytes - self.connections * self.stream_bytes_per_connection

    @property
    def tls(self) -> bool:
        """Whether the server speaks TLS."""
        return bool(self.tls_cert_file)

    @classmethod
    def parse(cls, argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> ServerConfig:
        """The config for `lossd serve` arguments (without the subcommand)."""
        parser = argparse.ArgumentParser(prog="lossd serve")
        cls.add_arguments(parser)
        return cls.load(parser.parse_args(argv), environ)
