"""Tenants: who is calling, with what share of the server, and what they may hold.

A tenants file (TOML, `--tenants-file`) names each tenant, how it proves who it is (bearer tokens,
stored as SHA-256 digests; or, with mutual TLS, its client certificate's subject), its weight in
the fair queue and its quotas:

    [tenants.team-a]
    tokens = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
    subjects = ["CN=worker-a"]        # mutual TLS: the client certificate's subject
    weight = 2                         # twice team-b's share of the compute when both wait
    max_resident_bytes = 1073741824    # what its resident tensors may hold (default: its share)
    max_concurrent_calls = 64          # calls in progress at once (0: no limit)
    max_inflight_bytes = 536870912     # memory its calls in progress may reserve (0: no limit)
    max_cost_per_s = 5e12              # estimated FLOPs a second, over any 1 s (0: no limit)

    [shared.teacher]                   # tensors the operator loads at start-up, read-only
    path = "teacher-head.npy"
    tenants = ["team-a", "team-b"]

Plaintext tokens (`--auth-token`, `--auth-token-file`) keep working: together they are the tenant
`default`. Without any of these, every call is the tenant `default`, as a server without auth has
always been. Pure Python: nothing of gRPC or torch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lossd.wire.tokens import load_tokens

__all__ = [
    "DEFAULT",
    "UNAUTHENTICATED",
    "SharedTensor",
    "Tenancy",
    "Tenant",
    "TenantDirectory",
    "load_tenancy",
    "parse_tenants",
    "token_digest",
]

_LOGGER = logging.getLogger(__name__)

DEFAULT = "default"
"""The tenant of calls on a server without tenants, and of the plaintext tokens."""
UNAUTHENTICATED = "unauthenticated"
"""The metrics' name for calls refused before they had a tenant."""

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_MAX_NAME = 63
_DIGEST_PREFIX = "sha256:"


def token_digest(token: str) -> bytes:
    """The SHA-256 digest a token is known by (the file stores it in hex after `sha256:`)."""
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class Tenant:
    """One tenant and its limits (0: none). `max_resident_bytes` None: its weight's share of the
    server's resident memory."""

    name: str
    weight: float = 1.0
    max_resident_bytes: int | None = None
    max_concurrent_calls: int = 0
    max_inflight_bytes: int = 0
    max_cost_per_s: float = 0.0


@dataclass(frozen=True)
class SharedTensor:
    """A tensor the operator loads at start-up (`.npy` or a torch-saved tensor), read-only to
    `tenants`."""

    name: str
    path: str
    tenants: frozenset[str]


@dataclass(frozen=True)
class Tenancy:
    """One parsed configuration: the tenants by name, and by credential."""

    tenants: Mapping[str, Tenant]
    by_digest: Mapping[bytes, str] = field(default_factory=dict)
    by_subject: Mapping[str, str] = field(default_factory=dict)
    shared: tuple[SharedTensor, ...] = ()

    @property
    def open(self) -> bool:
        """Whether calls need no credential (every call is `default`)."""
        return not self.by_digest and not self.by_subject

    @property
    def total_weight(self) -> float:
        return sum(tenant.weight for tenant in self.tenants.values())


OPEN = Tenancy({DEFAULT: Tenant(DEFAULT)})
"""A server without tenants: every call is `default`."""


def _name(name: object, where: str) -> str:
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME or set(name) - _NAME_CHARS:
        raise ValueError(
            f"{where}: tenant name {name!r} must be 1 to {_MAX_NAME} characters of a-z, 0-9, '-', '_', '.'"
        )
    if name == UNAUTHENTICATED:
        raise ValueError(f"{where}: {UNAUTHENTICATED!r} is reserved for calls without a tenant")
    return name


def _number(table: Mapping[str, Any], key: str, where: str, *, integer: bool, positive: bool = False) -> Any:
    value: Any = table.get(key)
    if value is None:
        return None
    number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not number or not math.isfinite(float(value)):
        raise ValueError(f"{where}.{key} is {value!r}; it must be {'an integer' if integer else 'a number'}")
    if float(value) < 0 or (positive and float(value) == 0):
        raise ValueError(f"{where}.{key} is {value!r}; it must be {'positive' if positive else 'at least 0'}")
    return value


def _strings(table: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"{where}.{key} must be a list of non-empty strings")
    return value


def _digest(text: str, where: str) -> bytes:
    if not text.startswith(_DIGEST_PREFIX):
        raise ValueError(
            f"{where}: a token is stored as 'sha256:<64 hex digits>' (its SHA-256 digest: "
            "printf %s TOKEN | sha256sum), never in plaintext"
        )
    hexdigits = text[len(_DIGEST_PREFIX) :].strip().lower()
    if len(hexdigits) != 64 or set(hexdigits) - set("0123456789abcdef"):
        raise ValueError(f"{where}: {text[:16]!r}... is not 'sha256:' and 64 hex digits")
    return bytes.fromhex(hexdigits)


_TENANT_KEYS = frozenset(
    {
        "tokens",
        "subjects",
        "weight",
        "max_resident_bytes",
        "max_concurrent_calls",
        "max_inflight_bytes",
        "max_cost_per_s",
    }
)


def parse_tenants(text: str, source: str = "the tenants file", *, base: str = ".") -> Tenancy:
    """A tenants file's configuration; a ValueError says what is wrong and where. `base`: the
    directory shared tensors' relative paths start from."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source} is not valid TOML: {exc}") from None
    unknown = set(document) - {"tenants", "shared"}
    if unknown:
        raise ValueError(
            f"{source}: unknown table(s) {', '.join(sorted(unknown))}; it has [tenants.*] and [shared.*]"
        )
    tables = document.get("tenants", {})
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"{source} names no tenant: add a [tenants.<name>] table")
    tenants: dict[str, Tenant] = {}
    by_digest: dict[bytes, str] = {}
    by_subject: dict[str, str] = {}
    for raw_name, table in tables.items():
        where = f"{source}: tenants.{raw_name}"
        name = _name(raw_name, where)
        if not isinstance(table, dict):
            raise ValueError(f"{where} must be a table")
        unknown = set(table) - _TENANT_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        for item in _strings(table, "tokens", where):
            digest = _digest(item, f"{where}.tokens")
            if digest in by_digest:
                raise ValueError(f"{where}.tokens: a token is also tenant {by_digest[digest]!r}'s")
            by_digest[digest] = name
        for subject in _strings(table, "subjects", where):
            if subject in by_subject:
                raise ValueError(f"{where}.subjects: {subject!r} is also tenant {by_subject[subject]!r}'s")
            by_subject[subject] = name
        weight = _number(table, "weight", where, integer=False, positive=True)
        tenants[name] = Tenant(
            name,
            weight=float(weight) if weight is not None else 1.0,
            max_resident_bytes=_number(table, "max_resident_bytes", where, integer=True),
            max_concurrent_calls=_number(table, "max_concurrent_calls", where, integer=True) or 0,
            max_inflight_bytes=_number(table, "max_inflight_bytes", where, integer=True) or 0,
            max_cost_per_s=float(_number(table, "max_cost_per_s", where, integer=False) or 0.0),
        )
    shared: list[SharedTensor] = []
    shared_tables = document.get("shared", {})
    if not isinstance(shared_tables, dict):
        raise ValueError(f"{source}: shared must hold [shared.<name>] tables")
    for raw_name, table in shared_tables.items():
        where = f"{source}: shared.{raw_name}"
        name = _name(raw_name, where)
        if not isinstance(table, dict) or not isinstance(table.get("path"), str) or not table["path"]:
            raise ValueError(f'{where} needs path = "<file>" (.npy, or a torch-saved tensor)')
        unknown = set(table) - {"path", "tenants"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        readers = frozenset(_strings(table, "tenants", where))
        missing = readers - set(tenants)
        if missing:
            raise ValueError(f"{where}.tenants names no such tenant: {', '.join(sorted(missing))}")
        shared.append(SharedTensor(name, os.path.join(base, table["path"]), readers))
    return Tenancy(tenants, by_digest, by_subject, tuple(shared))


def _with_default_tokens(tenancy: Tenancy, tokens: Iterable[str]) -> Tenancy:
    """`tenancy` with the plaintext tokens as the tenant `default` (added if the file lacks it)."""
    digests = dict(tenancy.by_digest)
    for token in tokens:
        owner = digests.setdefault(token_digest(token), DEFAULT)
        if owner != DEFAULT:
            raise ValueError(f"a plaintext token is also tenant {owner!r}'s in the tenants file")
    tenants = dict(tenancy.tenants)
    tenants.setdefault(DEFAULT, Tenant(DEFAULT))
    return Tenancy(tenants, digests, tenancy.by_subject, tenancy.shared)


def load_tenancy(tenants_file: str = "", token: str = "", token_file: str = "") -> Tenancy:
    """The configuration from the tenants file and the plaintext tokens; a ValueError names the
    file and what is wrong."""
    tokens = load_tokens(token, token_file)
    if tenants_file:
        try:
            with open(tenants_file, encoding="utf-8") as file:
                text = file.read()
        except OSError as exc:
            raise ValueError(f"tenants_file {tenants_file!r} cannot be read: {exc.strerror}") from None
        tenancy = parse_tenants(text, f"tenants_file {tenants_file!r}", base=os.path.dirname(tenants_file))
        return _with_default_tokens(tenancy, tokens) if tokens else tenancy
    if tokens:
        return _with_default_tokens(Tenancy({}), tokens)
    return OPEN


def _stamp(paths: Iterable[str]) -> tuple[tuple[int, int, int] | None, ...]:
    stamps: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(stamps)


class TenantDirectory:
    """The current configuration, reloaded when its files change (`check`, polled) or on demand
    (`reload`, SIGHUP). A configuration that does not load keeps the last good one: the log says
    why and `on_reload(ok)` is told. Calls in flight keep the `Tenant` they started with."""

    def __init__(
        self,
        tenants_file: str = "",
        token: str = "",
        token_file: str = "",
        on_reload: Callable[[bool], None] | None = None,
    ) -> None:
        self._files = tuple(path for path in (tenants_file, token_file) if path)
        self._load: Callable[[], Tenancy] = lambda: load_tenancy(tenants_file, token, token_file)
        self._on_reload = on_reload
        self._stamp = _stamp(self._files)
        self.tenancy = self._load()  # a bad file at start-up fails the start
        self.last_error = ""

    @property
    def watched(self) -> bool:
        """Whether there are files to watch."""
        return bool(self._files)

    def changed(self) -> bool:
        """Whether a file changed since the last look (its time, size or inode: an editor's save,
        or a Kubernetes secret's atomic swap)."""
        stamp = _stamp(self._files)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def reload(self) -> bool:
        """Loads the files again; on failure keeps the last good configuration."""
        try:
            tenancy = self._load()
        except ValueError as exc:
            self.last_error = str(exc)
            _LOGGER.error("tenants not reloaded, the last good configuration stays: %s", exc)
            if self._on_reload is not None:
                self._on_reload(False)
            return False
        dropped = set(self.tenancy.tenants) - set(tenancy.tenants)
        self.tenancy = tenancy
        self.last_error = ""
        _LOGGER.info(
            "tenants reloaded: %d tenant(s)%s",
            len(tenancy.tenants),
            f", removed {', '.join(sorted(dropped))}" if dropped else "",
        )
        if self._on_reload is not None:
            self._on_reload(True)
        return True
