"""The documentation's promises: the README's two commands exist and CI runs the test one, its
links lead somewhere, every setting is documented, the grpcurl example answers as quoted, and every
Python block of the README and of docs/ runs against a real server."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import json_format

from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc

from conftest import RunningServer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]


def test_the_two_commands_exist_and_ci_runs_the_test_one() -> None:
    for command in ("scripts/serve", "scripts/test"):
        assert f"\n{command} " in README
        assert (ROOT / command).stat().st_mode & 0o111, f"{command} is not executable"
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_is_a_front_door() -> None:
    assert len(README.splitlines()) <= 200, "the README is a front door; the reference lives in docs/"
    for page in DOCS:
        assert f"(docs/{page.name})" in README, f"the README does not lead to docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_relative_link_leads_somewhere(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_grpcurl_example_answers_as_documented(channel: grpc.Channel) -> None:
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    block = re.search(r"tests/test_readme\.py sends this request.*?```json\n(.*?)```", protocol, re.S)
    assert block, "the example request is gone"
    request = json_format.Parse(block.group(1), pb.ComputeLossRequest())
    response = pb_grpc.LossServiceStub(channel).ComputeLoss(request, timeout=30)
    answer = json_format.MessageToDict(response)
    assert f'`loss.data` `"{answer["loss"]["data"]}"`' in protocol
    assert f'`gradients.input.data`\n`"{answer["gradients"]["input"]["data"]}"`' in protocol


def test_every_setting_is_in_the_settings_table() -> None:
    import dataclasses

    from lossd.server.config import ServerConfig

    serving = (ROOT / "docs" / "serving.md").read_text()
    for spec in dataclasses.fields(ServerConfig):
        env = f"`{ServerConfig.env_name(spec.name)}`"
        assert env in serving, f"the settings table lacks {env}"
        if not spec.metadata["secret"]:
            assert f"`--{spec.name.replace('_', '-')}`" in serving, f"the settings table lacks --{spec.name}"


def _blocks(page: Path) -> list[str]:
    """A page's Python blocks, but those marked `tests/test_readme.py: not run` (with the reason)."""
    text = page.read_text()
    blocks = re.findall(r"(<!-- tests/test_readme\.py: not run[^>]*-->\n)?```python\n(.*?)```", text, re.S)
    return [code for marker, code in blocks if not marker]


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_the_python_examples_run_in_order(
    page: Path, server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every Python block of a page, pasted in order into one session against a real server."""
    run = _blocks(page)
    namespace: dict[str, object] = {}
    for code in run:
        exec(compile(code.replace("localhost:50051", server.target), page.name, "exec"), namespace)
    if page.name == "README.md":
        assert len(run) >= 3, "the README's examples are gone"
        model = namespace["model"]
        assert isinstance(model, torch.nn.Linear) and model.weight.grad is not None
        assert namespace["student"].weight.grad is not None  # type: ignore[attr-defined]
    if page.name == "client.md":
        assert "TARGET_OUT_OF_RANGE target" in capsys.readouterr().out


def test_every_page_with_python_has_examples_that_run() -> None:
    assert {page.name for page in PAGES if _blocks(page)} >= {"README.md", "client.md", "losses.md"}
