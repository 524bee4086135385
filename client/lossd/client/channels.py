"""gRPC channels to one lossd server or several: round-robin balancing, keepalive, retries.

A long-lived HTTP/2 connection pins every call to one server; to spread calls over replicas the
client must balance them itself. The channel this module builds balances per call (round_robin)
over every address the target resolves to: a `dns:///name:port` target (a Kubernetes headless
Service, say: DNS answers every pod, and is asked again when connections fail) or a list of
`host:port` addresses. Calls that fail `UNAVAILABLE` (a server stopping, killed, or its device
failed), or that a shutting-down server cancelled, are retried on another server by gRPC's retry
policy: loss calls are idempotent. Keepalive
pings find a dead server on an idle connection without waiting for a call to time out.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from typing import Any

import grpc

from lossd.wire.errors import InvalidArgumentError

__all__ = [
    "DEFAULT_RETRY_ATTEMPTS",
    "RETRY_BUFFER_BYTES",
    "SERVICE",
    "auth_metadata",
    "channel_options",
    "make_aio_channel",
    "make_channel",
    "resolve_target",
    "service_config",
    "tls_credentials",
]

SERVICE = "lossd.v1.LossService"
DEFAULT_RETRY_ATTEMPTS = 5
"""Attempts per call (the first included) while servers answer UNAVAILABLE."""
RETRY_BUFFER_BYTES = 16 << 20
"""A call stays retryable while it has sent at most this much (gRPC must keep the bytes to resend)."""
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

Options = Sequence[tuple[str, Any]]


def service_config(retry_attempts: int = DEFAULT_RETRY_ATTEMPTS) -> str:
    """The gRPC service config: round_robin, and retries of UNAVAILABLE, of a server's CANCELLED
    and of a RESOURCE_EXHAUSTED that names when to come back (none if attempts < 2)."""
    method: dict[str, Any] = {"name": [{"service": SERVICE}]}
    if retry_attempts >= 2:
        method["retryPolicy"] = {
            "maxAttempts": retry_attempts,
            "initialBackoff": "0.05s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            # UNAVAILABLE: a server draining, gone, or whose device failed. CANCELLED from a server
            # (a client's own cancellation is never retried) means it shut down with the call
            # received but not yet started, or past its drain grace: safe to send elsewhere.
            # RESOURCE_EXHAUSTED: retried only after the delay the server's refusal names in
            # grpc-retry-pushback-ms (a tenant's limits, a full queue); every other refusal of
            # that code carries -1, which tells gRPC not to retry.
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED"],
        }
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method]})


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def _target_error(target: str, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"target {target!r} {why}", reason="TARGET_INVALID", field="target", metadata={"target": target}
    )


def _plain_target(target: str) -> str:
    """A string target as gRPC takes it (see `resolve_target`)."""
    scheme, sep, rest = target.partition("://")
    if not sep or target.startswith(_GRPC_SCHEMES):
        if not target:
            raise _target_error(target, "is empty: give host:port, such as localhost:50051")
        return target
    scheme = scheme.lower()
    if scheme == "https":
        raise _target_error(
            target,
            "asks for TLS by its scheme: give host:port and pass credentials= "
            "(lossd.client.channels.tls_credentials) to the client",
        )
    if scheme not in ("http", "grpc"):
        raise _target_error(
            target, "has a scheme gRPC does not know: give host:port, or dns:///name:port for a name"
        )
    address = rest.rstrip("/")
    if not address or "/" in address:
        raise _target_error(target, "holds a path: give host:port only, such as localhost:50051")
    if not address.rpartition(":")[2].isdigit() or address.endswith("]"):
        raise _target_error(target, "names no port: give host:port (lossd serves on 50051 unless told)")
    return address


def resolve_target(target: str | Sequence[str]) -> tuple[str, str | None]:
    """A gRPC target and the authority to present for it.

    A string is any gRPC target (`host:port`, `dns:///name:port`, `ipv4:`, `unix:`...), used as is;
    `http://host:port` and `grpc://host:port` (what a URL-minded user writes) mean `host:port`;
    `https://` is refused with the TLS hint. A list of `host:port` addresses becomes one
    `ipv4:` (or `ipv6:`) target over all of them, host names looked up now; the authority (for TLS
    host-name checks) is then the first address's host.
    """
    if isinstance(target, str):
        return _plain_target(target), None
    if not target:
        raise ValueError("target: no address given")
    resolved: list[tuple[int, str, int]] = []
    for address in target:
        host, port = _split(address)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            found.sort(key=lambda info: info[0] != socket.AF_INET)  # IPv4 first, so that lists agree
            ip = ipaddress.ip_address(found[0][4][0])
        resolved.append((ip.version, str(ip), port))
    versions = {version for version, _, _ in resolved}
    if len(versions) > 1:
        raise ValueError("target: mixes IPv4 and IPv6 addresses; use one family (or a dns:/// name)")
    if versions == {4}:
        joined = ",".join(f"{ip}:{port}" for _, ip, port in resolved)
        scheme = "ipv4"
    else:
        joined = ",".join(f"[{ip}]:{port}" for _, ip, port in resolved)
        scheme = "ipv6"
    first = _split(target[0])[0]
    return f"{scheme}:{joined}", first


def channel_options(
    max_message_bytes: int = -1,
    *,
    retry_attempts: int = DEFAULT_RETRY_ATTEMPTS,
    authority: str | None = None,
    extra: Options = (),
) -> list[tuple[str, Any]]:
    """Message limits, balancing, retries and keepalive; `extra` options last, so they win."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.service_config", service_config(retry_attempts)),
        ("grpc.enable_retries", 1 if retry_attempts >= 2 else 0),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
        *_KEEPALIVE,
    ]
    if authority is not None:
        options.append(("grpc.default_authority", authority))
    return [*options, *extra]


def tls_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS to the server: its CA (None: the system's roots), and for mutual TLS this client's
    certificate and key (PEM files)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file go together: set both or neither")

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as file:
            return file.read()

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries a bearer token (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _target_and_options(
    target: str | Sequence[str], max_message_bytes: int, retry_attempts: int, options: Options
) -> tuple[str, list[tuple[str, Any]]]:
    resolved, authority = resolve_target(target)
    opts = channel_options(
        max_message_bytes, retry_attempts=retry_attempts, authority=authority, extra=options
    )
    return resolved, opts


def make_channel(
    target: str | Sequence[str],
    *,
    credentials: grpc.ChannelCredentials | None = None,
    max_message_bytes: int = -1,
    retry_attempts: int = DEFAULT_RETRY_ATTEMPTS,
    options: Options = (),
) -> grpc.Channel:
    """A blocking channel to `target` (see `resolve_target`) with lossd's balancing and retries."""
    resolved, opts = _target_and_options(target, max_message_bytes, retry_attempts, options)
    if credentials is not None:
        return grpc.secure_channel(resolved, credentials, options=opts)
    return grpc.insecure_channel(resolved, options=opts)


def make_aio_channel(
    target: str | Sequence[str],
    *,
    credentials: grpc.ChannelCredentials | None = None,
    max_message_bytes: int = -1,
    retry_attempts: int = DEFAULT_RETRY_ATTEMPTS,
    options: Options = (),
) -> grpc.aio.Channel:
    """The asyncio twin of `make_channel`."""
    resolved, opts = _target_and_options(target, max_message_bytes, retry_attempts, options)
    if credentials is not None:
        return grpc.aio.secure_channel(resolved, credentials, options=opts)
    return grpc.aio.insecure_channel(resolved, options=opts)
