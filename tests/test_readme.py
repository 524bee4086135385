"""The README's promises: its two commands exist and CI runs the test one; its examples work."""

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


def test_the_two_commands_exist_and_ci_runs_the_test_one() -> None:
    for command in ("scripts/serve", "scripts/test"):
        assert f"\n{command} " in README
        assert (ROOT / command).stat().st_mode & 0o111, f"{command} is not executable"
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_the_grpcurl_example_answers_as_documented(channel: grpc.Channel) -> None:
    block = re.search(r"tests/test_readme\.py sends this request.*?```json\n(.*?)```", README, re.S)
    assert block, "the README's example request is gone"
    request = json_format.Parse(block.group(1), pb.ComputeLossRequest())
    response = pb_grpc.LossServiceStub(channel).ComputeLoss(request, timeout=30)
    answer = json_format.MessageToDict(response)
    assert f'`loss.data` `"{answer["loss"]["data"]}"`' in README
    assert f'`inputGradient.data`\n`"{answer["inputGradient"]["data"]}"`' in README


def test_every_setting_is_in_the_settings_table() -> None:
    import dataclasses

    from lossd.server.config import ServerConfig

    for spec in dataclasses.fields(ServerConfig):
        env = f"`{ServerConfig.env_name(spec.name)}`"
        assert env in README, f"the README's settings table lacks {env}"
        if not spec.metadata["secret"]:
            assert f"`--{spec.name.replace('_', '-')}`" in README, f"the README lacks --{spec.name}"


def test_the_python_examples_run_in_order(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    """Every Python block of the README, pasted in order into one session against a real server;
    only blocks marked `tests/test_readme.py: not run` (with the reason) are left out."""
    blocks = re.findall(r"(<!-- tests/test_readme\.py: not run[^>]*-->\n)?```python\n(.*?)```", README, re.S)
    run = [code for marker, code in blocks if not marker]
    assert len(run) >= 4, "the README's Python examples are gone"
    namespace: dict[str, object] = {}
    for code in run:
        exec(compile(code.replace("localhost:50051", server.target), "README.md", "exec"), namespace)
    assert "TARGET_OUT_OF_RANGE target" in capsys.readouterr().out
    model = namespace["model"]
    assert isinstance(model, torch.nn.Linear) and model.weight.grad is not None
    kd = namespace["kd"]
    assert kd.grad.dtype == torch.bfloat16  # type: ignore[attr-defined]
