"""Per-tenant admission: how many calls a tenant has in progress, how much memory they reserve,
and how much estimated compute it spent in the last second, each against its limits.

A refusal is `RESOURCE_EXHAUSTED` with a retry delay (`grpc-retry-pushback-ms` on the wire): the
tenant's own limit, not the server's state, so it says when to come back. A call estimated above
the server's `max_call_cost`, or above what its tenant may spend in a whole second, is refused for
good (no delay helps). Pure Python; the event loop is the only user.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lossd.server.tenants import Tenant
from lossd.wire.errors import ResourceExhaustedError

__all__ = ["Account", "Admission"]

RETRY_CALLS_S = 0.05
"""The retry delay a refusal for too many calls in progress suggests."""


@dataclass(eq=False)
class Account:
    """What one tenant holds now. `tenant` is its latest configuration (a reload updates it)."""

    tenant: Tenant
    calls: int = 0
    inflight_bytes: int = 0
    cost: float = 0.0
    """Estimated cost admitted, not yet reported to the metrics."""
    _credit: float = field(default=0.0, repr=False)
    _credited: float = field(default_factory=time.monotonic, repr=False)

    @property
    def name(self) -> str:
        return self.tenant.name

    def check_bytes(self, nbytes: int) -> None:
        """Refuses reserving `nbytes` more when the tenant's `max_inflight_bytes` would be passed."""
        limit = self.tenant.max_inflight_bytes
        if limit and self.inflight_bytes + nbytes > limit:
            alone = nbytes > limit
            raise ResourceExhaustedError(
                f"tenant {self.name!r} has {self.inflight_bytes} bytes reserved by its calls in progress "
                f"and this one needs {nbytes} more: its limit is {limit} (max_inflight_bytes)"
                + ("" if alone else "; retry when some have finished"),
                reason="TENANT_MEMORY",
                metadata={
                    "tenant": self.name,
                    "inflightBytes": str(self.inflight_bytes),
                    "requestBytes": str(nbytes),
                    "maxInflightBytes": str(limit),
                },
                retry_after=None if alone else 0.1,
            )

    def spend(self, cost: float, now: float | None = None) -> None:
        """Charges an estimated cost to the tenant's `max_cost_per_s` (a bucket that refills at
        that rate and holds at most one second of it); refuses when it is short."""
        rate = self.tenant.max_cost_per_s
        if not rate:
            return
        now = time.monotonic() if now is None else now
        self._credit = min(rate, self._credit + (now - self._credited) * rate)
        self._credited = now
        if cost > rate:
            raise ResourceExhaustedError(
                f"this call's estimated cost is {cost:.4g} FLOPs, more than tenant {self.name!r} may "
                f"spend in a second ({rate:.4g}, max_cost_per_s): send smaller calls",
                reason="TENANT_COST_RATE",
                metadata={"tenant": self.name, "cost": f"{cost:.6g}", "maxCostPerSecond": f"{rate:.6g}"},
            )
        if cost > self._credit:
            wait = (cost - self._credit) / rate
            raise ResourceExhaustedError(
                f"tenant {self.name!r} spent its compute for now ({rate:.4g} estimated FLOPs a second, "
                f"max_cost_per_s); retry in {wait:.3f} s",
                reason="TENANT_COST_RATE",
                metadata={"tenant": self.name, "cost": f"{cost:.6g}", "maxCostPerSecond": f"{rate:.6g}"},
                retry_after=round(max(wait, 0.001), 3),
            )
        self._credit -= cost


class Admission:
    """Every tenant's `Account`, by name (bounded: the tenants configured, ever)."""

    def __init__(self, max_call_cost: float = 0.0) -> None:
        self.max_call_cost = max_call_cost
        self.accounts: dict[str, Account] = {}

    def account(self, tenant: Tenant) -> Account:
        account = self.accounts.get(tenant.name)
        if account is None:
            account = self.accounts[tenant.name] = Account(tenant)
            account._credit = tenant.max_cost_per_s
        elif account.tenant is not tenant:
            account.tenant = tenant
        return account

    def enter(self, tenant: Tenant) -> Account:
        """Counts a call in; refuses it when its tenant has `max_concurrent_calls` in progress."""
        account = self.account(tenant)
        limit = tenant.max_concurrent_calls
        if limit and account.calls >= limit:
            raise ResourceExhaustedError(
                f"tenant {tenant.name!r} has {account.calls} calls in progress, its limit "
                f"(max_concurrent_calls {limit}); retry when one has finished",
                reason="TENANT_CALLS",
                metadata={
                    "tenant": tenant.name,
                    "calls": str(account.calls),
                    "maxConcurrentCalls": str(limit),
                },
                retry_after=RETRY_CALLS_S,
            )
        account.calls += 1
        return account

    @staticmethod
    def leave(account: Account) -> None:
        account.calls -= 1

    def check_cost(self, cost: float) -> None:
        """Refuses, before any compute, a call estimated above `max_call_cost`."""
        if self.max_call_cost and cost > self.max_call_cost:
            raise ResourceExhaustedError(
                f"this call's estimated cost is {cost:.4g} FLOPs, more than one call may take on this "
                f"server ({self.max_call_cost:.4g}, max_call_cost): split it into smaller calls",
                reason="CALL_TOO_COSTLY",
                metadata={"cost": f"{cost:.6g}", "maxCallCost": f"{self.max_call_cost:.6g}"},
            )
