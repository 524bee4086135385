"""The code's shape, enforced: who may import whom, no import cycles, and no code outside a loss's
own module that asks which loss a call is.

Rooms: `lossd.v1` (generated), `lossd.wire` (what client and server share), `lossd.server.losses`
(one module per loss), `lossd.server.engine` (pure torch compute), `lossd.server.rpc` (gRPC
servicers), the server's top level (app, batcher, memory, metrics, config, workers), `lossd.client`,
and `lossd.cli` (the command, the only importer of the app).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = ("wire", "server", "client")
LOSS_NAMES = (
    "nll_loss",
    "cross_entropy",
    "kl_div",
    "distillation",
    "linear_cross_entropy",
    "linear_distillation",
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports (a module, or a module's attribute: `lossd.wire.codec`, ...)
    line: int
    top_level: bool  # at import time (not inside a function)
    type_only: bool  # under `if TYPE_CHECKING:`


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> Iterator[tuple[str, Path]]:
    for root in SOURCE_ROOTS:
        for path in sorted((ROOT / root).rglob("*.py")):
            yield _module_name(ROOT / root, path), path


def _imports(module: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, top_level: bool, type_only: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for statement in child.body:
                    yield from visit_one(statement, top_level, True)
                for statement in child.orelse:
                    yield from visit_one(statement, top_level, type_only)
                continue
            yield from visit_one(child, top_level, type_only)

    def visit_one(node: ast.AST, top_level: bool, type_only: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno, top_level, type_only)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                yield Import(module, f"{base}.{alias.name}", node.lineno, top_level, type_only)
        else:
            inner = top_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from visit(node, inner, type_only)

    yield from visit(tree, True, False)


ALL = [(module, path, list(_imports(module, path))) for module, path in _sources()]
MODULES = {module for module, _, _ in ALL}


def _resolve(target: str) -> str:
    """The lossd module an import loads (`lossd.wire.codec.TensorLimits` -> `lossd.wire.codec`)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_sources_are_where_the_rules_look() -> None:
    assert {"lossd.wire.codec", "lossd.server.losses.base", "lossd.server.engine.loss_engine"} <= MODULES
    assert {"lossd.server.rpc.servicer", "lossd.server.app", "lossd.client._client", "lossd.cli"} <= MODULES
    assert sum(len(imports) for _, _, imports in ALL) > 200


RULES = [
    # (who, what it must not import, why)
    ("lossd.server.losses", ("grpc", "prometheus_client", "google.protobuf", "lossd.v1"), "pure torch"),
    ("lossd.server.engine", ("grpc", "prometheus_client", "google.protobuf", "lossd.v1"), "pure torch"),
    ("lossd.server.losses", ("lossd.server.engine", "lossd.server.rpc"), "losses sit below the engine"),
    (
        "lossd.server.engine",
        ("lossd.server.rpc", "lossd.server.batcher", "lossd.server.memory"),
        "compute only",
    ),
    ("lossd.server.batcher", ("google.protobuf", "lossd.v1", "grpc"), "knows nothing of messages"),
    ("lossd.server", ("lossd.client",), "the server never imports the client"),
    ("lossd.client", ("lossd.server",), "the client never imports the server"),
    ("lossd.wire", ("lossd.server", "lossd.client", "lossd.cli"), "shared by both"),
]


@pytest.mark.parametrize(("who", "banned", "why"), RULES, ids=[f"{r[0]}: {r[2]}" for r in RULES])
def test_import_rules(who: str, banned: tuple[str, ...], why: str) -> None:
    found = [
        f"{i.module}:{i.line} imports {i.target}"
        for module, _, imports in ALL
        if _within(module, who)
        for i in imports
        if not i.type_only and any(_within(i.target, ban) for ban in banned)
    ]
    checked = [module for module, _, _ in ALL if _within(module, who)]
    assert checked, f"no module under {who}"
    assert not found, f"{why}: " + "; ".join(found)


def test_only_the_command_line_imports_the_app() -> None:
    importers = {
        i.module for _, _, imports in ALL for i in imports if _within(_resolve(i.target), "lossd.server.app")
    }
    assert importers == {"lossd.cli"}


def test_no_import_cycles() -> None:
    """Between modules at import time, and between rooms counting every import (lazy ones too)."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for module, _, imports in ALL:
        for i in imports:
            target = _resolve(i.target)
            # A package's own __init__ imported by its modules is the package, not a cycle edge.
            if i.top_level and not i.type_only and target and not _within(module, target):
                graph[module].add(target)
    assert _cycle(graph) is None, f"import cycle: {_cycle(graph)}"

    def room(module: str) -> str:
        """A package of the server, the wire or the client; each module of the server's top level
        (app, batcher, memory, ...) is a room of its own."""
        for prefix in (
            "lossd.server.losses",
            "lossd.server.engine",
            "lossd.server.rpc",
            "lossd.wire",
            "lossd.client",
        ):
            if _within(module, prefix):
                return prefix
        return module

    rooms: dict[str, set[str]] = {}
    for module, _, imports in ALL:
        if module.endswith("__main__"):
            continue  # `python -m lossd.server` runs the command line, imported by nothing
        for i in imports:
            target = _resolve(i.target)
            if target and not i.type_only and room(target) != room(module):
                rooms.setdefault(room(module), set()).add(room(target))
    assert _cycle(rooms) is None, f"cycle between rooms: {_cycle(rooms)}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _loss_mentions(path: Path) -> Iterator[str]:
    """Places in code (not docstrings or comments) that name one of the losses."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {  # docstrings, and the strings that document an attribute after it
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if any(name in node.value for name in LOSS_NAMES):
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}"
        elif isinstance(node, ast.Attribute) and (
            node.attr in LOSS_NAMES
            or node.attr.endswith("LossOptions")
            or (node.attr.isupper() and "KL" in node.attr)
        ):
            yield f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}"
        elif isinstance(node, ast.Name) and node.id in (
            "NLL_LOSS",
            "CROSS_ENTROPY",
            "KL_DIV",
            "DISTILLATION",
        ):
            yield f"{path.relative_to(ROOT)}:{node.lineno} {node.id}"


def test_outside_its_module_no_code_asks_which_loss_a_call_is() -> None:
    """Losses are named only in their own module (and the registry that lists them) on the server,
    and in their declaration on the client; everything else works through the `Loss` interface."""
    allowed = {
        ROOT / "server/lossd/server/losses/nll.py",
        ROOT / "server/lossd/server/losses/cross_entropy.py",
        ROOT / "server/lossd/server/losses/kl_div.py",
        ROOT / "server/lossd/server/losses/distillation.py",  # composes torch's F.cross_entropy
        ROOT / "server/lossd/server/losses/linear_cross_entropy.py",
        ROOT / "server/lossd/server/losses/linear_distillation.py",
        ROOT / "server/lossd/server/losses/registry.py",
        ROOT / "client/lossd/client/losses.py",
    }
    mentions = [mention for _, path, _ in ALL if path not in allowed for mention in _loss_mentions(path)]
    assert not mentions, "loss-specific code outside its module:\n" + "\n".join(mentions)
    planted = ROOT / "server/lossd/server/losses/kl_div.py"
    assert list(_loss_mentions(planted)), "the check finds names where they are"


def test_the_wire_loads_without_torch() -> None:
    """The client's base install has no torch: the wire imports it only where a torch tensor is
    given."""
    script = (
        "import sys, lossd.wire.codec, lossd.wire.chunks, lossd.wire.status, lossd.client._client\n"
        "assert 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_engine_and_losses_load_no_grpc_protobuf_or_metrics() -> None:
    """At run time, transitively: what the import rules above check statement by statement."""
    script = (
        "import sys, lossd.server.engine, lossd.server.losses, lossd.server.batcher\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'prometheus_client')"
        " or m.startswith(('google.protobuf', 'lossd.v1')))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
