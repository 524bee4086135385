"""The server: health, reflection, failure containment, configuration, and `lossd serve` as a process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lossd.client import LossClient, errors
from lossd.client._client import DEFAULT_STREAM_THRESHOLD
from lossd.server.config import ServerConfig
from lossd.server.engine import LossEngine, resolve_device

from conftest import RunningServer, SlowEngine
from processes import ServeProcess

LOGITS = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
LABELS = np.array([0, 2, 1, 1])


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def test_health_is_serving(server: RunningServer) -> None:
    assert _health(server.target) == health_pb2.HealthCheckResponse.SERVING
    assert _health(server.target, "lossd.v1.LossService") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="lossd.v1.LossService"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {service.name for service in listed.list_services_response.service}
    assert {"lossd.v1.LossService", "grpc.health.v1.Health"} <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    service = next(f for f in files if f.name == "lossd/v1/loss_service.proto").service[0]
    assert [m.name for m in service.method] == [
        "ComputeLoss",
        "StreamLoss",
        "PutTensor",
        "ListTensors",
        "DeleteTensor",
        "ComputeLossBatch",
    ]
    assert "lossd/v1/tensor.proto" in {f.name for f in files}  # dependencies travel too


class BrokenEngine(LossEngine):
    def compute_batch(self, calls: Any, merge: bool = True) -> Any:
        raise RuntimeError("secret internal detail")


def test_unexpected_failure_is_internal_and_contained(
    server_factory: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    broken = server_factory(engine=BrokenEngine("cpu"))
    with LossClient(broken.target, timeout=30) as client:
        with pytest.raises(errors.InternalError) as caught:
            client.cross_entropy(LOGITS, LABELS)
        assert "secret" not in caught.value.message  # details go to the log, not the client
        assert caught.value.reason == "INTERNAL"
        with pytest.raises(errors.InternalError):  # the server lives on to answer the next call
            client.nll_loss(LOGITS, LABELS)
    assert "secret internal detail" in caplog.text
    assert _health(broken.target) == health_pb2.HealthCheckResponse.SERVING


def test_health_answers_during_a_long_computation(server_factory: Callable[..., RunningServer]) -> None:
    slow = server_factory(engine=SlowEngine(delay=1.5))
    with LossClient(slow.target, timeout=30) as client:
        worker = threading.Thread(target=client.cross_entropy, args=(LOGITS, LABELS))
        worker.start()
        time.sleep(0.3)
        started = time.perf_counter()
        assert _health(slow.target) == health_pb2.HealthCheckResponse.SERVING
        assert time.perf_counter() - started < 1.0, "health waited for the computation"
        worker.join()


def test_config_precedence_flag_env_default() -> None:
    env = {"LOSSD_PORT": "6000", "LOSSD_DEVICE": "cpu", "LOSSD_MAX_MESSAGE_BYTES": "1234"}
    assert ServerConfig.parse([], environ={}) == ServerConfig()
    config = ServerConfig.parse(["--port", "7000"], environ=env)
    assert (config.port, config.device, config.max_message_bytes) == (7000, "cpu", 1234)
    # Small by default: gRPC reads a whole message before lossd sees it; the client streams above 4 MiB.
    assert ServerConfig().port == 50051 and ServerConfig().max_message_bytes == 8 * 2**20
    assert ServerConfig().max_message_bytes >= 2 * DEFAULT_STREAM_THRESHOLD
    with pytest.raises(ValueError, match="LOSSD_PORT='x'"):
        ServerConfig.parse([], environ={"LOSSD_PORT": "x"})


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="cpu' or 'cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


# -- `lossd serve` as its own process --------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_lossd_serve_starts_answers_and_stops_cleanly(
    serve_process: Callable[..., ServeProcess], stop_signal: signal.Signals
) -> None:
    served = serve_process(
        "--host", "127.0.0.1", env={"LOSSD_PORT": "0", "LOSSD_DEVICE": "cpu", "LOSSD_METRICS_PORT": "0"}
    )
    started = served.wait_for(
        r"lossd (\S+) serving lossd\.v1\.LossService on 127\.0\.0\.1:(\d+) "
        r"\(device cpu, torch (\S+), grpcio (\S+), batching on, (\d+) torch threads\)"
    )
    target = f"127.0.0.1:{started.group(2)}"
    assert started.group(3) == torch.__version__
    assert _health(target) == health_pb2.HealthCheckResponse.SERVING
    with LossClient(target, timeout=30) as client:
        assert client.cross_entropy(LOGITS, LABELS).loss.shape == ()
    served.process.send_signal(stop_signal)
    code, log = served.finish()
    assert code == 0, log
    assert "lossd stopped" in log


def test_lossd_serve_refuses_a_bad_device(serve_process: Callable[..., ServeProcess]) -> None:
    code, log = serve_process("--port", "0", "--device", "tpu", "--metrics-port", "0").finish()
    assert code == 1
    assert "cannot serve" in log and "tpu" in log


def test_lossd_serve_refuses_a_busy_port(serve_process: Callable[..., ServeProcess]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, log = serve_process(
            "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--metrics-port", "0"
        ).finish()
    assert code == 1
    assert f"could not bind 127.0.0.1:{port}" in log


def test_lossd_serve_help_names_every_setting() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lossd.server", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    for flag in ("--host", "--port", "--device", "--max-message-bytes", "LOSSD_MAX_MESSAGE_BYTES"):
        assert flag in done.stdout
