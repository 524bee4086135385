"""The README's promises: its two commands exist and CI runs the test one; its example request works."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
from google.protobuf import json_format

from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc

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
