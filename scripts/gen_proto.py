#!/usr/bin/env python3
"""Regenerates the committed Python code for proto/lossd/v1 and proto/lossd/v1/oip (or, with
--check, verifies it).

The generator is pinned: gencode stamps the protobuf and grpcio versions it needs at run time,
so a different grpcio-tools would change what users must install.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGES = {
    "lossd/v1": '"""Generated protobuf and gRPC code for the lossd.v1 API (see proto/lossd/v1/*.proto)."""\n',
    "lossd/v1/oip": (
        '"""Generated code for the Open Inference Protocol (KServe v2), as lossd serves it.\n\n'
        'See proto/lossd/v1/oip/open_inference.proto.\n"""\n'
    ),
}
PINNED = {"grpcio-tools": "1.84.0", "mypy-protobuf": "5.1.0"}
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _check_pins() -> None:
    for name, wanted in PINNED.items():
        have = importlib.metadata.version(name)
        if have != wanted:
            sys.exit(f"gen_proto: {name}=={wanted} is required, found {have}")


def _plugin(name: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    path = scripts / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        sys.exit(f"gen_proto: {name} not found (install mypy-protobuf=={PINNED['mypy-protobuf']})")
    return found


def generate(out: Path) -> list[Path]:
    """Writes the generated packages under `out`; returns the files written, relative to `out`."""
    from grpc_tools import protoc

    protos = sorted(p for package in PACKAGES for p in (PROTO_ROOT / package).glob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        sys.exit("gen_proto: protoc failed")
    written = []
    for name, init_text in PACKAGES.items():
        package = out / name
        (package / "__init__.py").write_text(init_text)
        (package / "py.typed").write_text("")
        written += [p.relative_to(out) for p in package.iterdir() if p.is_file()]
    return sorted(written)


def _committed_generated() -> set[Path]:
    found = set()
    for name in PACKAGES:
        package = PROTO_ROOT / name
        found |= {p.relative_to(PROTO_ROOT) for p in package.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
        found |= {Path(name) / "__init__.py", Path(name) / "py.typed"}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    opts = parser.parse_args()
    _check_pins()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = generate(out)
        if opts.check:
            stale = [str(p) for p in set(files) ^ _committed_generated()]
            for new in files:
                old = PROTO_ROOT / new
                old_text = old.read_text() if old.exists() else ""
                if old_text != (out / new).read_text():
                    stale.append(str(new))
                    diff = difflib.unified_diff(
                        old_text.splitlines(),
                        (out / new).read_text().splitlines(),
                        str(old),
                        "regenerated",
                        lineterm="",
                    )
                    print("\n".join(list(diff)[:40]))
            if stale:
                print(
                    f"stale generated code: {sorted(set(stale))}; run scripts/gen_proto.py", file=sys.stderr
                )
                return 1
            print("generated code is up to date")
            return 0
        for old in _committed_generated():
            if old.name.endswith(GENERATED_SUFFIXES):
                (PROTO_ROOT / old).unlink()
        for new in files:
            (PROTO_ROOT / new).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / new, PROTO_ROOT / new)
            print(f"wrote {(PROTO_ROOT / new).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
