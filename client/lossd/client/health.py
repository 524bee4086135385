"""`lossd health`: asks a server's gRPC health service whether it is SERVING; the exit status says.

For container HEALTHCHECKs, exec probes and scripts: 0 when SERVING, 1 otherwise (NOT_SERVING,
unknown service, unreachable, timed out, refused), with the reason on stderr. Imports neither
torch nor the server, so it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_arguments", "check"]


def _default_target() -> str:
    return f"127.0.0.1:{os.environ.get('LOSSD_PORT', '50051')}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=None,
        help="server address (default 127.0.0.1:$LOSSD_PORT, or 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--service", default="", help="service to ask about: '' (the server, default) or lossd.v1.LossService"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds before giving up (default 5)")
    parser.add_argument(
        "--tls-ca-file",
        default=os.environ.get("LOSSD_HEALTH_TLS_CA_FILE"),
        help="speak TLS, trusting this PEM CA (env LOSSD_HEALTH_TLS_CA_FILE); plaintext without it",
    )
    parser.add_argument(
        "--tls-cert-file",
        default=os.environ.get("LOSSD_HEALTH_TLS_CERT_FILE"),
        help="client certificate for a mutual-TLS server (env LOSSD_HEALTH_TLS_CERT_FILE)",
    )
    parser.add_argument(
        "--tls-key-file",
        default=os.environ.get("LOSSD_HEALTH_TLS_KEY_FILE"),
        help="its key (env LOSSD_HEALTH_TLS_KEY_FILE)",
    )
    parser.add_argument(
        "--tls-server-name",
        default=os.environ.get("LOSSD_HEALTH_TLS_SERVER_NAME"),
        help="name the server certificate must carry, when it is not the target's host",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        help="bearer token file, for a server whose health checks need one (else $LOSSD_AUTH_TOKEN if set)",
    )


def check(args: argparse.Namespace) -> int:
    """Runs one health check; the exit status (0: SERVING)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lossd.client.channels import auth_metadata, tls_credentials
    from lossd.wire.tokens import load_tokens

    target = args.target or _default_target()
    if args.token_file:
        try:
            token = load_tokens("", args.token_file)[0]
        except ValueError as exc:
            print(f"lossd health: {exc}", file=sys.stderr)
            return 1
    else:
        token = os.environ.get("LOSSD_AUTH_TOKEN", "")
    metadata = auth_metadata(token)
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    if args.tls_ca_file:
        credentials = tls_credentials(args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout, metadata=metadata
            )
        except grpc.RpcError as error:
            code = error.code()
            print(f"lossd health: {target}: {code.name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{target} {args.service or '(server)'}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1
