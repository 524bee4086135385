"""Fuzzing a real `lossd serve` process: random and mutated serialized requests and streams, and
semantically random calls; every answer must be a correct result or a clean status with a message.
No crash, no hang (every call has a deadline), no leak; the server is healthy after.

Budget: `LOSSD_FUZZ_EXAMPLES` examples per test (CI: the default, 200); `scripts/fuzz N` runs
longer and prints the case count. Atheris is not used: its coverage guidance instruments Python
code in-process, while the interesting surface here is a separate server process behind gRPC;
hypothesis's structure-aware generation and shrinking reach the same parsers over the wire.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc
import hypothesis.strategies as st
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from test_torch_agreement import _departure, _normalized, _torch, calls

from lossd.client._calls import prepare_call
from lossd.client.errors import InvalidArgumentError
from lossd.v1 import loss_service_pb2 as pb
from lossd.wire import chunks, codec

from cases import same_bits
from processes import ServeProcess

EXAMPLES = int(os.environ.get("LOSSD_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=EXAMPLES <= 200,  # CI: the same cases every run; longer runs explore
)
UNARY = "/lossd.v1.LossService/ComputeLoss"
STREAM = "/lossd.v1.LossService/StreamLoss"
CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
OUTCOMES: collections.Counter[str] = collections.Counter()


class Fuzzed:
    def __init__(self, served: ServeProcess, target: str) -> None:
        self.served = served
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
        self.unary = self.channel.unary_unary(UNARY)
        self.stream = self.channel.stream_stream(STREAM)

    def rss(self) -> int:
        with open(f"/proc/{self.served.process.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    served = ServeProcess(
        "--host=127.0.0.1", "--port=0", "--metrics-port=0", "--device=cpu", "--max-tensor-bytes=268435456"
    )
    server = Fuzzed(served, served.serving())
    yield server
    server.channel.close()
    served.process.terminate()
    code, log = served.finish(60)
    print(json.dumps({"fuzz_cases": sum(OUTCOMES.values()), "outcomes": dict(sorted(OUTCOMES.items()))}))
    assert code == 0, log
    assert "Traceback" not in log and "INTERNAL" not in log, log


def _clean(error: grpc.RpcError) -> str:
    """Asserts a failed call ended cleanly: an expected code, a message, lossd's ErrorInfo."""
    code = error.code()  # type: ignore[attr-defined]
    message = error.details()  # type: ignore[attr-defined]
    assert code in CLEAN, (code, message)
    assert message, code
    trailers = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    raw = trailers.get("grpc-status-details-bin")
    if raw is None:  # only gRPC's own message-size check answers without lossd's details
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
        return f"{code.name} (grpc)"
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(raw).details[0].Unpack(info)
    assert info.domain == "lossd" and info.reason.isupper(), info
    return f"{code.name} {info.reason}"


def _answer(fuzzed: Fuzzed, payload: bytes) -> tuple[str, pb.ComputeLossResponse | None]:
    try:
        raw = fuzzed.unary(payload, timeout=30)
    except grpc.RpcError as error:
        return _clean(error), None
    response = pb.ComputeLossResponse.FromString(raw)
    codec.decode_torch(response.loss, "loss")  # a well-formed tensor
    return "OK", response


def _valid_request(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    rows, classes = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    kind = ("nll_loss", "cross_entropy", "kl_div")[seed % 3]
    x = rng.standard_normal((rows, classes)).astype(np.float32)
    target: Any = (
        rng.integers(0, classes, rows) if kind != "kl_div" else rng.random((rows, classes)).astype(np.float32)
    )
    return prepare_call(kind, x, target, return_grad=bool(seed % 2)).unary().SerializeToString()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(_valid_request(draw(st.integers(0, 2**16))))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12]))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            other = _valid_request(draw(st.integers(0, 2**16)))
            data[at:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(fuzzed: Fuzzed, payload: bytes) -> None:
    outcome, _ = _answer(fuzzed, payload)
    OUTCOMES[f"random: {outcome}"] += 1


@FUZZ
@given(mutated())
def test_mutated_requests(fuzzed: Fuzzed, payload: bytes) -> None:
    outcome, _ = _answer(fuzzed, payload)
    OUTCOMES[f"mutated: {outcome}"] += 1


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """A stream: a (maybe mutated) header, then chunks of random tensor names, offsets and sizes."""
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    rows, classes = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    call = prepare_call("cross_entropy", np.ones((rows, classes), np.float32), rng.integers(0, classes, rows))
    request = call.request
    if draw(st.booleans()):
        request.target.data = rng.integers(0, classes, rows).astype(np.int64).tobytes()
    header = bytearray(chunks.encode_header(request))
    if draw(st.integers(0, 3)) == 0 and header:
        header[draw(st.integers(0, len(header) - 1))] ^= 0xFF
    messages = [bytes(header)] if draw(st.integers(0, 9)) else []
    size = rows * classes * 4
    if draw(st.integers(0, 4)) == 0:  # the whole input, in chunks of any size: a valid stream
        data = rng.standard_normal((rows, classes)).astype(np.float32).tobytes()
        step = draw(st.integers(1, size))
        messages += [chunks.encode_chunk("input", at, data[at : at + step]) for at in range(0, size, step)]
        return messages
    offset = 0
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 5)) == 0:
            messages.append(draw(st.binary(max_size=32)))
            continue
        name = draw(
            st.sampled_from(["input", "input", "input", "target", "cross_entropy.weight", "", "loss"])
        )
        name = name if draw(st.integers(0, 5)) else draw(st.text(max_size=12))
        length = draw(st.integers(0, size + 8))
        at = offset if draw(st.integers(0, 3)) else draw(st.integers(0, size + 8))
        messages.append(chunks.encode_chunk(name, at, bytes(length)))
        offset = at + length
    return messages


@FUZZ
@given(streams())
def test_streams(fuzzed: Fuzzed, messages: list[bytes]) -> None:
    try:
        answer = list(fuzzed.stream(iter(messages), timeout=30))
    except grpc.RpcError as error:
        OUTCOMES[f"stream: {_clean(error)}"] += 1
        return
    assert answer and isinstance(chunks.decode_part(answer[0]), memoryview)
    OUTCOMES["stream: OK"] += 1


@FUZZ
@given(calls())
def test_semantically_random_calls(fuzzed: Fuzzed, args: dict[str, Any]) -> None:
    """Valid and invalid calls over the wire: accepted exactly when torch accepts, then torch's bits."""
    torch_errors = (RuntimeError, ValueError, IndexError, NotImplementedError)
    try:
        expected = _torch(args)
    except torch_errors:
        try:
            expected = _torch(_normalized(args))
        except torch_errors:
            expected = None
    kind: str = args["kind"]
    options: dict[str, Any] = {"reduction": args["reduction"], "return_grad": args["input_grad"]}
    if kind == "kl_div":
        options["log_target"] = args["log_target"]
    else:
        options["weight"] = args["weight"]
        if args["ignore_index"] is not None:
            options["ignore_index"] = args["ignore_index"]
        if kind == "cross_entropy":
            options["label_smoothing"] = args["label_smoothing"]
    try:
        request = prepare_call(kind, args["input"], args["target"], **options).unary()
    except InvalidArgumentError:
        OUTCOMES["semantic: refused by the client"] += 1
        return
    outcome, response = _answer(fuzzed, request.SerializeToString())
    OUTCOMES[f"semantic: {outcome}"] += 1
    if response is None:
        assert expected is None or _departure(args), f"lossd refused what torch accepts: {outcome}"
        return
    assert expected is not None and not _departure(args), "lossd accepted what torch refuses"
    loss, grad = expected
    assert same_bits(codec.decode_torch(response.loss, "loss"), loss)
    if grad is not None:
        assert same_bits(codec.decode_torch(response.gradients["input"], "gradients.input"), grad)


def test_the_server_is_healthy_and_does_not_leak_after_fuzzing(fuzzed: Fuzzed) -> None:
    health = health_pb2_grpc.HealthStub(fuzzed.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    rng = np.random.default_rng(0)
    garbage = [rng.bytes(int(rng.integers(1, 300))) for _ in range(50)]

    def round_of_calls() -> None:
        for i in range(500):
            _answer(fuzzed, _valid_request(i) if i % 2 else garbage[i % 50])
            if i % 10 == 0:
                try:
                    list(fuzzed.stream(iter([garbage[i % 50]]), timeout=30))
                except grpc.RpcError as error:
                    _clean(error)

    round_of_calls()  # warm: caches, allocator arenas
    before = fuzzed.rss()
    started = time.monotonic()
    round_of_calls()
    growth = fuzzed.rss() - before
    print(
        json.dumps({"leak_check_rss_growth_bytes": growth, "seconds": round(time.monotonic() - started, 2)}),
        file=sys.stderr,
    )
    assert growth < 4 << 20, f"the server grew {growth} bytes over 550 calls"
