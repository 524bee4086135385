"""The code's shape, enforced: who may import whom, no import cycles (`TYPE_CHECKING` imports
included), and a loss is its module: no code outside it names the loss, its tensors, its outputs
or its options.

Rooms: `lossd.v1` (generated), `lossd.wire` (what client and server share), `lossd.server.losses`
(one module per loss), `lossd.server.engine` (pure torch compute), `lossd.server.rpc` (gRPC
servicers), the server's top level (app, batcher, memory, metrics, config, workers), `lossd.client`,
and `lossd.cli` (the command, the only importer of the app).

`python tests/test_architecture.py` prints, for each loss, the files that name it or its tensors,
outputs and options.
"""

from __future__ import annotations

import ast
import collections
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lossd.client.losses import DECLARATIONS
from lossd.server.losses import LOSSES, Loss

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = ("wire", "server", "client")


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
    """Between modules at import time, and between rooms counting every import (lazy ones too);
    `TYPE_CHECKING` imports count: a cycle that only type checking sees is still two modules that
    need each other."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for module, _, imports in ALL:
        for i in imports:
            target = _resolve(i.target)
            # A package's own __init__ imported by its modules is the package, not a cycle edge.
            if i.top_level and target and not _within(module, target):
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
            if target and room(target) != room(module):
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


# -- a loss is its module -------------------------------------------------------------------------


def loss_names(loss: Loss[Any]) -> set[str]:
    """What belongs to one loss: its name, its own tensors, its outputs and its options."""
    return {
        loss.name,
        *(spec.name for spec in loss.tensors),
        *(spec.name for spec in loss.outputs),
        *loss.parameters,
    }


SHARED = {
    f"lossd.server.losses.{name}"
    for name in ("base", "functional", "chunked", "checks", "validation", "implementations", "registry")
} | {"lossd.server.losses"}
"""The losses' interface and shared machinery: they name no loss and nothing of one."""
REGISTRY = "lossd.server.losses.registry"
"""The one list of the losses: it names each (its module and instance), nothing of them."""
DECLARATIONS_MODULE = "lossd.client.losses"
"""The client's declaration of every loss."""
COINCIDENCES = {
    ("lossd.server.metrics", "labels"): "prometheus_client's Metric.labels() and help texts",
    ("lossd.server.losses.linear_cross_entropy", "cut_cross_entropy"): "Apple's package, a candidate kernel",
    ("lossd.server.losses.linear_cross_entropy", "_cut_cross_entropy"): "its adapter",
    **{
        (module, "weight"): "a tenant's weight in the fair queue (lossd.server.tenants)"
        for module in (
            "lossd.server.tenants",
            "lossd.server.batcher",
            "lossd.server.app",
            "lossd.server.config",
            "lossd.server.resident",
            "lossd.server.rpc.batch",
            "lossd.server.rpc.lifecycle",
        )
    },
}
"""Words that are a loss's name for something and also another library's word for another."""


def own_modules(loss: Loss[Any]) -> set[str]:
    """A loss's module and the family modules it is built from (those it imports, directly or
    not, in lossd.server.losses: `classes`, `heads`, a sibling loss it reuses), the shared
    machinery aside."""
    imports = {module: {_resolve(i.target) for i in found} for module, _, found in ALL}
    start = type(loss).__module__
    seen, todo = {start}, [start]
    while todo:
        for target in imports.get(todo.pop(), ()):
            if _within(target, "lossd.server.losses") and target not in seen and target not in SHARED:
                seen.add(target)
                todo.append(target)
    return seen


def _snake(word: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", word).lower()


def _words(path: Path) -> Iterator[tuple[int, str]]:
    """The words of a module's code (not its docstrings or comments): every identifier it defines
    or uses, and every word of its string constants (error messages, field paths), snake_cased."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {  # docstrings, and the strings that document an attribute after it
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    for node in ast.walk(tree):
        found: list[str] = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", node.value)
        elif isinstance(node, ast.Name):
            found = [node.id]
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "F":
                continue  # torch.nn.functional's own names: F.cross_entropy composes torch's loss
            found = [node.attr]
        elif isinstance(node, ast.arg) or (isinstance(node, ast.keyword) and node.arg):
            found = [node.arg]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found = [node.name]
        elif isinstance(node, ast.alias):
            found = [(node.asname or node.name).rsplit(".", 1)[-1]]
        for word in found:
            yield getattr(node, "lineno", 0), _snake(word)


def _named(word: str) -> set[str]:
    """The losses a word names something of: one of their names, or (for a loss's own name) any
    word containing it (`CROSS_ENTROPY`, `CrossEntropyLossOptions`)."""
    return {
        name
        for name, loss in LOSSES.items()
        if word in loss_names(loss) or (name in word and len(word) > len(name))
    }


def mentions() -> list[tuple[str, Path, int, str, set[str]]]:
    """(module, path, line, word, the losses it names something of) for the whole code."""
    found = []
    for module, path, _ in ALL:
        for line, word in _words(path):
            losses = _named(word)
            if losses:
                found.append((module, path, line, word, losses))
    return found


def _allowed(module: str, word: str, loss: str) -> bool:
    if module == DECLARATIONS_MODULE or (module, word) in COINCIDENCES:
        return True
    if module == REGISTRY:
        return loss in word  # the loss's module and instance, nothing of the loss
    if module in own_modules(LOSSES[loss]):
        return True
    # A module built from another loss's module (linear_distillation from distillation) names it.
    return module in LOSS_MODULES and type(LOSSES[loss]).__module__ in own_modules(LOSS_MODULES[module])


LOSS_MODULES = {type(loss).__module__: loss for loss in LOSSES.values()}


def mentions_by_loss() -> dict[str, list[str]]:
    """For each loss, the files that name it, its tensors, outputs or options as its own (a word
    another loss has too, `weight`, counts for the loss whose module it is in)."""
    files: dict[str, set[str]] = collections.defaultdict(set)
    for module, path, _, word, losses in mentions():
        for loss in losses:
            if (module, word) not in COINCIDENCES and _allowed(module, word, loss):
                files[loss].add(str(path.relative_to(ROOT)))
    return {name: sorted(files[name]) for name in LOSSES}


def test_a_loss_is_named_only_in_its_own_modules() -> None:
    """Outside a loss's module (and the family modules it is built from), the registry's line and
    the client's declaration, no code names the loss, its tensors, outputs or options: the
    engine, rpc, wire, Open Inference Protocol and client code work from the declarations."""
    wrong = [
        f"{path.relative_to(ROOT)}:{line} {word} ({', '.join(sorted(losses))})"
        for module, path, line, word, losses in mentions()
        if not any(_allowed(module, word, loss) for loss in losses)
    ]
    assert not wrong, "loss-specific code outside its module:\n" + "\n".join(wrong)
    planted = [m for m in mentions() if m[0] == "lossd.server.losses.kl_div"]
    assert {"kl_div", "log_target"} <= {m[3] for m in planted}, "the check finds names where they are"
    assert own_modules(LOSSES["nll_loss"]) == {"lossd.server.losses.nll", "lossd.server.losses.classes"}
    by_loss = mentions_by_loss()
    assert by_loss["kl_div"] == [
        "client/lossd/client/losses.py",
        "server/lossd/server/losses/classes.py",  # the class dimension's view as rows
        "server/lossd/server/losses/kl_div.py",
        "server/lossd/server/losses/registry.py",
    ]
    for name, files in by_loss.items():
        module = type(LOSSES[name]).__module__
        built_from_it = {m for m, other in LOSS_MODULES.items() if module in own_modules(other)}
        expected = {
            _file(m) for m in own_modules(LOSSES[name]) | built_from_it | {REGISTRY, DECLARATIONS_MODULE}
        }
        assert set(files) <= expected, (name, sorted(set(files) - expected))


def _file(module: str) -> str:
    return next(str(path.relative_to(ROOT)) for name, path, _ in ALL if name == module)


def test_the_declarations_of_a_loss_agree() -> None:
    """What the server module, the .proto options message and the client declaration say of each
    loss is the same: names, tensors, options, outputs and gradients."""
    from lossd.v1 import loss_service_pb2 as pb

    oneof = pb.ComputeLossRequest.DESCRIPTOR.oneofs_by_name["loss"]
    assert [field.name for field in oneof.fields] == list(LOSSES) == list(DECLARATIONS)
    for field in oneof.fields:
        loss, declaration = LOSSES[field.name], DECLARATIONS[field.name]
        message = field.message_type
        tensors = [f.name for f in message.fields if f.message_type is not None]
        scalars = [f.name for f in message.fields if f.message_type is None]
        assert tensors == [spec.name for spec in loss.tensors], loss.name
        assert all(f.message_type.full_name == "lossd.v1.Tensor" for f in message.fields if f.message_type)
        assert sorted(scalars) == sorted(loss.parameters), loss.name
        assert sorted(declaration.tensors) == sorted(tensors), loss.name
        assert sorted(declaration.options) == sorted(scalars), loss.name
        assert sorted(declaration.outputs.values()) == sorted(spec.name for spec in loss.outputs)
        assert sorted(declaration.gradients.values()) == sorted(loss.differentiable), loss.name
        assert declaration.unreduced == {spec.name for spec in loss.outputs if not spec.reduced}


def test_the_loss_interface_is_small() -> None:
    """What every loss must give is options (derived), check, compute and its cost (and a warm-up
    example); merging and streaming are a separate piece (`Rows`) that the losses computed alone
    do not have, and nothing is stubbed."""
    import inspect

    from lossd.server.losses.base import Rows

    required = {name for name, member in vars(Loss).items() if getattr(member, "__isabstractmethod__", False)}
    assert required == {"check", "loss_shape", "compute", "scratch_bytes", "flops", "example"}
    for name in ("linear_cross_entropy", "linear_distillation"):
        assert LOSSES[name].rows is None
        source = inspect.getsource(type(LOSSES[name]))
        assert "merge" not in source and "NotImplementedError" not in source
    assert all(isinstance(loss.rows, Rows) for name, loss in LOSSES.items() if not name.startswith("linear"))


THIRD_PARTY_PRIVATE = {"_C", "_base"}
"""torch's own: `torch._C` (the host allocator's cache) and a view's `_base` (its storage owner)."""


def test_no_module_uses_another_modules_private_members() -> None:
    """A `_name` is used only where it is defined (on `self`, `cls`, or an object of a class of the
    same module): what one room needs of another is public, so that no module reaches into
    another's state."""
    wrong = []
    for _, path, _ in ALL:
        tree = ast.parse(path.read_text(), str(path))
        defined = {
            node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        defined |= {
            target.attr
            for node in ast.walk(tree)
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Attribute)
        }
        defined |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr in defined or node.attr in THIRD_PARTY_PRIVATE:
                continue
            wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not wrong, "private members used outside their module:\n" + "\n".join(wrong)


def test_importing_the_client_changes_nothing_process_wide() -> None:
    """No warning filter or logging handler changes when the client (or the wire it shares with the
    server) is imported."""
    script = (
        "import logging, warnings\n"
        "import grpc, numpy, torch  # what they change themselves is theirs\n"
        "filters, handlers = list(warnings.filters), list(logging.getLogger().handlers)\n"
        "import lossd.client, lossd.client._client, lossd.client.torch, lossd.wire.codec, lossd.wire.chunks\n"
        "assert warnings.filters == filters, 'the warning filters changed'\n"
        "assert logging.getLogger().handlers == handlers, 'the root logger changed'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


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


if __name__ == "__main__":
    for name, files in mentions_by_loss().items():
        print(f"{name}: {', '.join(files)}")
