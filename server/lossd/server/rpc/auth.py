"""Who a call is: its tenant, from its bearer token (`authorization: Bearer <token>`) or, with
mutual TLS, its client certificate's subject (`lossd.server.tenants`).

Checked first in every call's lifecycle, before any message is read: no tensor is decoded for a
caller without a valid credential. A token is known by its SHA-256 digest and looked up by it: the
time a lookup takes depends on the digest, which the caller cannot steer towards a real token's, so
it says nothing about how much of a token was right. Health checks may stay open for probes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import grpc

from lossd.server.tenants import DEFAULT, Tenant, TenantDirectory, token_digest
from lossd.wire.errors import UnauthenticatedError

__all__ = ["HEALTH_METHODS", "Authenticator"]

HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_SCHEME = "bearer "
_OPEN = Tenant(DEFAULT)


class Authenticator:
    """A call's tenant, or `UNAUTHENTICATED`; `on_refusal(reason)` counts refusals."""

    def __init__(self, directory: TenantDirectory, on_refusal: Callable[[str], None] | None = None) -> None:
        self.directory = directory
        self._on_refusal = on_refusal

    def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> Tenant:
        """The tenant of the call `context` is of; raises `UnauthenticatedError`."""
        tenancy = self.directory.tenancy
        if tenancy.open:
            return tenancy.tenants.get(DEFAULT, _OPEN)
        subject = ""
        if tenancy.by_subject:
            found = list((context.auth_context() or {}).get("x509_subject", ()))
            subject = found[0].decode("utf-8", "replace") if found else ""
        tenant, error = self.check(context.invocation_metadata(), subject)
        if error is not None:
            if self._on_refusal is not None:
                self._on_refusal(error.reason)
            raise error
        assert tenant is not None
        return tenant

    def check(
        self, metadata: Iterable[tuple[str, Any]] | None, subject: str = ""
    ) -> tuple[Tenant | None, UnauthenticatedError | None]:
        """The tenant the metadata's token (else the certificate's `subject`) names, or the error
        to answer with."""
        tenancy = self.directory.tenancy
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if isinstance(header, str) and header.lower().startswith(_SCHEME):
            name = tenancy.by_digest.get(token_digest(header[len(_SCHEME) :].strip()))
            if name is not None:
                return tenancy.tenants[name], None
            return None, UnauthenticatedError(
                "the bearer token is not accepted by this server", reason="TOKEN_INVALID"
            )
        if subject:
            name = tenancy.by_subject.get(subject)
            if name is not None:
                return tenancy.tenants[name], None
        if tenancy.by_subject and not tenancy.by_digest:
            return None, UnauthenticatedError(
                "this server identifies callers by their client certificate, and this one's subject "
                "is no tenant's",
                reason="SUBJECT_UNKNOWN",
            )
        return None, UnauthenticatedError(
            "this server needs a bearer token: send the metadata 'authorization: Bearer <token>'",
            reason="TOKEN_MISSING",
        )
