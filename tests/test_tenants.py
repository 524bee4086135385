"""Tenants: identity (tokens, client certificates), reloads, what is each tenant's own, costs, limits,
the fair queue, quiet cancels and the metrics by tenant (docs/tenants.md's threat table names these
tests)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from lossd.client import LossClient, errors
from lossd.client._calls import build_request
from lossd.client.channels import tls_credentials
from lossd.server.admission import Account, Admission
from lossd.server.batcher import MIN_WORK, Batcher, BatchLimits
from lossd.server.engine import LossEngine
from lossd.server.engine.finite import nonfinite_fields
from lossd.server.losses import LOSSES, LossCall
from lossd.server.resident import ResidentInfo, ResidentStore
from lossd.server.tenants import DEFAULT, Tenant, parse_tenants
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd.v1 import tensor_pb2
from lossd.wire.errors import ResourceExhaustedError
from lossd.wire.status import PUSHBACK_KEY, from_rpc_error, rich_status

from certificates import Pki, make_pki
from conftest import RunningServer, SlowEngine
from processes import ServeProcess, free_port

LOGITS = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
LABELS = np.arange(8) % 10


def digest(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def write_tenants(path: Path, tenants: dict[str, dict[str, Any]], extra: str = "") -> None:
    """A tenants file: each tenant's settings (`token` becomes its digest)."""
    text = ""
    for name, settings in tenants.items():
        text += f"[tenants.{name}]\n"
        for key, value in settings.items():
            if key == "token":
                text += f'tokens = ["{digest(value)}"]\n'
            elif isinstance(value, str):
                text += f'{key} = "{value}"\n'
            elif isinstance(value, list):
                text += f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]\n"
            else:
                text += f"{key} = {value}\n"
        text += "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + extra)
    tmp.replace(path)


def _call(target: str, token: str | None, **kwargs: Any) -> str:
    """One small cross-entropy call's status code name."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    request = build_request("cross_entropy", LOGITS, LABELS, **kwargs)
    with grpc.insecure_channel(target) as channel:
        try:
            pb_grpc.LossServiceStub(channel).ComputeLoss(request, metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            return str(error.code().name)  # type: ignore[attr-defined]
    return "OK"


def _metric(running: RunningServer, name: str, labels: dict[str, str]) -> float:
    value = running.server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


# -- the tenants file ------------------------------------------------------------------------------


def test_a_tenants_file_names_tenants_by_token_digest_and_subject() -> None:
    tenancy = parse_tenants(
        f"""
[tenants.team-a]
tokens = ["{digest("a")}"]
subjects = ["CN=worker-a"]
weight = 2
max_resident_bytes = 1024
max_concurrent_calls = 4
max_inflight_bytes = 65536
max_cost_per_s = 1e9
[tenants.team-b]
tokens = ["{digest("b")}"]
"""
    )
    a = tenancy.tenants["team-a"]
    assert (
        a.weight,
        a.max_resident_bytes,
        a.max_concurrent_calls,
        a.max_inflight_bytes,
        a.max_cost_per_s,
    ) == (
        2.0,
        1024,
        4,
        65536,
        1e9,
    )
    assert tenancy.tenants["team-b"].weight == 1.0 and tenancy.tenants["team-b"].max_resident_bytes is None
    assert tenancy.by_digest[hashlib.sha256(b"b").digest()] == "team-b"
    assert tenancy.by_subject["CN=worker-a"] == "team-a"
    assert not tenancy.open and tenancy.total_weight == 3.0


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[tenants.a]\ntokens = ["plaintext"]\n', "never in plaintext"),
        ('[tenants.a]\ntokens = ["sha256:abc"]\n', "64 hex digits"),
        ("[tenants.A]\n", "tenant name"),
        ("[tenants.unauthenticated]\n", "reserved"),
        ("[tenants.a]\nwieght = 2\n", "unknown key"),
        ("[tenants.a]\nweight = 0\n", "positive"),
        ("[tenants.a]\nmax_concurrent_calls = -1\n", "at least 0"),
        ("[tenants.a]\nmax_inflight_bytes = 1.5\n", "an integer"),
        ("[tenants.a\n", "not valid TOML"),
        ("", "names no tenant"),
        ("[tenant.a]\n", "unknown table"),
        ('[tenants.a]\n[shared.head]\npath = "h.npy"\ntenants = ["b"]\n', "no such tenant"),
        (
            f'[tenants.a]\ntokens = ["{digest("x")}"]\n[tenants.b]\ntokens = ["{digest("x")}"]\n',
            "also tenant",
        ),
    ],
)
def test_a_bad_tenants_file_says_what_and_where(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_tenants(text)


def test_without_a_tenants_file_everything_is_the_default_tenant(server: RunningServer) -> None:
    assert server.server.tenants.tenancy.open
    assert _call(server.target, None) == "OK"
    assert _metric(server, "lossd_tenant_calls_total", {"tenant": DEFAULT, "code": "OK"}) >= 1


# -- identity and reloads --------------------------------------------------------------------------


def test_tokens_name_tenants_and_rotate_without_a_restart(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    path = tmp_path / "tenants.toml"
    write_tenants(path, {"team-a": {"token": "a-1"}, "team-b": {"token": "b-1"}})
    running = server_factory(tenants_file=str(path))
    assert _call(running.target, "a-1") == "OK" and _call(running.target, "b-1") == "OK"
    assert _call(running.target, None) == "UNAUTHENTICATED"
    assert _call(running.target, "a-2") == "UNAUTHENTICATED"
    assert _metric(running, "lossd_tenant_calls_total", {"tenant": "team-a", "code": "OK"}) == 1
    assert (
        _metric(running, "lossd_tenant_calls_total", {"tenant": "unauthenticated", "code": "UNAUTHENTICATED"})
        == 2
    )
    # Rotation: the new token works within 2 s, the old one is refused on its next call.
    write_tenants(path, {"team-a": {"token": "a-2"}, "team-b": {"token": "b-1"}})
    began = time.monotonic()
    while _call(running.target, "a-2") != "OK":
        assert time.monotonic() - began < 2.0, "the new token did not work within 2 s"
        time.sleep(0.05)
    assert _call(running.target, "a-1") == "UNAUTHENTICATED"
    # A file that does not parse keeps the last good configuration, and says so.
    path.write_text("[tenants.team-a\n")
    began = time.monotonic()
    while _metric(running, "lossd_tenants_reloads_total", {"result": "error"}) < 1:
        assert time.monotonic() - began < 5.0
        time.sleep(0.05)
    assert _metric(running, "lossd_tenants_config_ok", {}) == 0
    assert "not valid TOML" in running.server.tenants.last_error
    assert _call(running.target, "a-2") == "OK" and _call(running.target, "b-1") == "OK"
    write_tenants(path, {"team-a": {"token": "a-2"}})
    began = time.monotonic()
    while _call(running.target, "b-1") != "UNAUTHENTICATED":  # a removed tenant: refused next call
        assert time.monotonic() - began < 5.0
        time.sleep(0.05)
    assert _metric(running, "lossd_tenants_config_ok", {}) == 1


def test_a_call_in_flight_finishes_when_its_token_is_removed(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    path = tmp_path / "tenants.toml"
    write_tenants(path, {"team-a": {"token": "a-1"}})
    running = server_factory(SlowEngine(1.0), tenants_file=str(path))
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_call, running.target, "a-1")
        time.sleep(0.3)
        write_tenants(path, {"team-a": {"token": "a-2"}})
        assert running.server.reload_tenants()
        assert slow.result(timeout=30) == "OK"
    assert _call(running.target, "a-1") == "UNAUTHENTICATED"


def test_sighup_reloads_the_tenants_file(serve_process: Callable[..., ServeProcess], tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    write_tenants(path, {"team-a": {"token": "a-1"}})
    served = serve_process(
        "--host=127.0.0.1", "--port=0", "--metrics-port=0", "--device=cpu", f"--tenants-file={path}"
    )
    served.serving()
    served.process.send_signal(signal.SIGHUP)
    served.wait_for("tenants reloaded")
    served.process.terminate()
    code, log = served.finish()
    assert code == 0 and digest("a-1") not in log and "a-1" not in log.replace("team-a", "")


def test_a_client_certificate_subject_names_the_tenant(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    pki: Pki = make_pki(tmp_path)
    path = tmp_path / "tenants.toml"
    write_tenants(path, {"workers": {"subjects": ["CN=worker-1"]}, "other": {"token": "o"}})
    running = server_factory(
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca,
        tenants_file=str(path),
    )
    trusted = tls_credentials(pki.ca, pki.client_cert, pki.client_key)
    with LossClient(running.target, timeout=10, credentials=trusted) as client:
        assert client.cross_entropy(LOGITS, LABELS).loss.shape == ()
    assert _metric(running, "lossd_tenant_calls_total", {"tenant": "workers", "code": "OK"}) == 1
    write_tenants(path, {"other": {"token": "o"}})  # the subject is no tenant's any more
    assert running.server.reload_tenants()
    with (
        LossClient(running.target, timeout=10, credentials=trusted) as client,
        pytest.raises(errors.UnauthenticatedError) as refused,
    ):
        client.cross_entropy(LOGITS, LABELS)
    assert refused.value.reason == "TOKEN_MISSING"


# -- what is yours stays yours ---------------------------------------------------------------------


def _stub_call(target: str, token: str, method: str, request: Any) -> Any:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        return getattr(stub, method)(request, metadata=[("authorization", f"Bearer {token}")], timeout=30)


def _use(target: str, token: str, id: str) -> tuple[str, str, str]:
    request = build_request("cross_entropy", LOGITS, LABELS)
    request.cross_entropy.weight.CopyFrom(tensor_pb2.Tensor(resident_id=id))
    try:
        _stub_call(target, token, "ComputeLoss", request)
    except grpc.RpcError as error:
        lossd = from_rpc_error(error)
        return lossd.code, lossd.reason, lossd.message.replace(id, "<id>")
    return "OK", "", ""


def test_resident_tensors_are_scoped_to_their_tenant(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    path = tmp_path / "tenants.toml"
    write_tenants(path, {"team-a": {"token": "a"}, "team-b": {"token": "b", "max_resident_bytes": 4096}})
    running = server_factory(tenants_file=str(path), max_resident_bytes=1 << 20)
    held_bytes = torch.rand(10)
    with LossClient(running.target, timeout=30, token="a") as a:
        weight = a.resident(held_bytes)
        assert a.cross_entropy(LOGITS, LABELS, weight).loss.shape == ()
    listed = _stub_call(running.target, "b", "ListTensors", pb.ListTensorsRequest())
    assert list(listed.tensors) == [] and listed.resident_bytes == 0 and listed.max_resident_bytes == 4096
    # Using another tenant's id is answered exactly as an id that never existed.
    never = digest("never uploaded")
    assert _use(running.target, "b", weight.id) == _use(running.target, "b", never)
    assert _use(running.target, "b", weight.id)[:2] == ("NOT_FOUND", "RESIDENT_NOT_FOUND")
    assert not _stub_call(running.target, "b", "DeleteTensor", pb.DeleteTensorRequest(id=weight.id)).deleted
    # The same bytes uploaded by b are held again, as b's: no dedup across tenants.
    with LossClient(running.target, timeout=30, token="b") as b:
        assert b.resident(held_bytes).id == weight.id  # the same content, held again as b's
        with pytest.raises(errors.ResourceExhaustedError) as refused:
            b.resident(torch.zeros(2048))  # 8 KiB over b's 4 KiB quota
        assert refused.value.reason == "RESIDENT_TOO_LARGE" and "team-b" in refused.value.message
        for step in range(8):  # b's own LRU: only b's tensors go
            b.resident(torch.full((256,), float(step)))
    assert _use(running.target, "a", weight.id)[0] == "OK"
    assert _use(running.target, "b", weight.id)[0] == "NOT_FOUND"  # b's copy was let go: b's own LRU
    mine = _stub_call(running.target, "a", "ListTensors", pb.ListTensorsRequest())
    assert [t.id for t in mine.tensors] == [weight.id]
    assert _stub_call(running.target, "a", "DeleteTensor", pb.DeleteTensorRequest(id=weight.id)).deleted
    assert _metric(running, "lossd_tenant_resident_bytes", {"tenant": "team-a"}) == 0


def test_the_store_evicts_only_the_tenants_own_and_refuses_with_the_numbers() -> None:
    store = ResidentStore(100, "lru")
    a, b = Tenant("a", max_resident_bytes=60), Tenant("b", max_resident_bytes=60)

    def put(tenant: Tenant, id: str, nbytes: int) -> None:
        store.put(tenant, torch.zeros(nbytes, dtype=torch.uint8), ResidentInfo(id, 7, (nbytes,), nbytes))

    put(a, "a1", 40)
    put(b, "b1", 40)
    put(b, "b2", 20)
    put(b, "b3", 20)  # over b's quota: b1 goes, not a1
    assert [info.id for info in store.list(a)] == ["a1"]
    assert [info.id for info in store.list(b)] == ["b3", "b2"]
    put(a, "a2", 20)
    with pytest.raises(ResourceExhaustedError) as full:
        put(b, "b4", 50)  # b's own could go, but a's 60 leave the server only 40
    assert full.value.reason == "RESIDENT_FULL" and full.value.metadata["full"] == "server"
    assert [info.id for info in store.list(a)] == ["a2", "a1"]
    with pytest.raises(errors.NotFoundError):
        store.get(b, "a1", "input")


def test_an_operators_tensor_is_shared_read_only_with_named_tenants(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    weight = np.random.default_rng(1).random(10).astype(np.float32)
    np.save(tmp_path / "weight.npy", weight)
    path = tmp_path / "tenants.toml"
    write_tenants(
        path,
        {"team-a": {"token": "a"}, "team-b": {"token": "b"}},
        '[shared.class-weights]\npath = "weight.npy"\ntenants = ["team-a"]\n',
    )
    running = server_factory(tenants_file=str(path))
    listed = _stub_call(running.target, "a", "ListTensors", pb.ListTensorsRequest())
    (shared,) = listed.tensors
    assert shared.shared and list(shared.shape) == [10] and listed.resident_bytes == 0
    assert _use(running.target, "a", shared.id)[0] == "OK"
    assert _use(running.target, "b", shared.id)[:2] == ("NOT_FOUND", "RESIDENT_NOT_FOUND")
    assert not _stub_call(running.target, "a", "DeleteTensor", pb.DeleteTensorRequest(id=shared.id)).deleted
    assert _use(running.target, "a", shared.id)[0] == "OK"


# -- a resident tensor is checked once -------------------------------------------------------------


def test_a_resident_tensor_is_checked_when_put_and_trusted_after(
    server_factory: Callable[..., RunningServer],
) -> None:
    running = server_factory()
    head = torch.randn(16, 4)
    head[3, 1] = float("nan")
    with LossClient(running.target, timeout=30, nonfinite="refuse") as client:
        held = client.resident(head)
        hidden, labels = torch.randn(5, 4), torch.arange(5)
        with pytest.raises(errors.InvalidArgumentError) as refused:
            client.linear_cross_entropy(hidden, labels, held)
        assert refused.value.reason == "NONFINITE_VALUE"
        assert refused.value.field == "linear_cross_entropy.classifier"
    # Trusted: the call's resident flags are what is read, never the tensor.
    loss = LOSSES["linear_cross_entropy"]
    nan_head = torch.full((16, 4), float("nan"))
    call: LossCall[Any] = LossCall(
        loss.make_options(), torch.randn(5, 4), torch.arange(5), tensors={"classifier": nan_head}
    )
    assert nonfinite_fields(call) == ("linear_cross_entropy.classifier",)
    trusted = LossCall(
        call.options, call.input, call.target, tensors=call.tensors, resident={"classifier": False}
    )
    assert nonfinite_fields(trusted) == ()


def test_a_batch_counts_a_resident_head_once() -> None:
    loss = LOSSES["linear_cross_entropy"]
    head = torch.randn(1024, 64, dtype=torch.bfloat16)  # cast to float32 for each computation
    entries = [
        LossCall(
            loss.make_options(),
            torch.randn(1, 64, dtype=torch.bfloat16),
            torch.tensor([3]),
            tensors={"classifier": head},
            resident={"classifier": False},
        )
        for _ in range(64)
    ]
    one = LossEngine.footprint(entries[0])
    copy = loss.shared_scratch_bytes(entries[0])
    assert copy == head.numel() * 4
    assert LossEngine.footprints(entries) == 64 * (one - copy) + copy


# -- cost and limits -------------------------------------------------------------------------------


def test_each_loss_declares_its_cost() -> None:
    for loss in LOSSES.values():
        call = LossEngine("cpu").prepare(loss.example())
        cost = loss.cost(call)
        assert cost.flops > 0 and cost.memory >= 0 and cost.bytes > 0, loss.name
    linear = LOSSES["linear_cross_entropy"]
    call = LossCall(
        linear.make_options(),
        torch.zeros(8, 32),
        torch.zeros(8, dtype=torch.long),
        tensors={"classifier": torch.zeros(100, 32)},
    )
    assert linear.flops(call) == 8 * 100 * 32 * 2 + 10 * 8 * 100
    graded = LossCall(call.options, call.input, call.target, tensors=call.tensors, grads=frozenset({"input"}))
    assert linear.flops(graded) == 8 * 100 * 32 * 2 * 3 + 10 * 8 * 100


def test_a_call_over_the_cost_limit_is_refused_before_any_compute(
    server_factory: Callable[..., RunningServer],
) -> None:
    engine = SlowEngine(0.0)
    running = server_factory(engine, max_call_cost=1e5)
    assert _call(running.target, None) == "OK"  # 8 x 10 logits: 400 FLOPs
    computed = engine.calls
    big = np.zeros((4096, 10), np.float32)
    with LossClient(running.target, timeout=30) as client:
        with pytest.raises(errors.ResourceExhaustedError) as refused:
            client.cross_entropy(big, np.zeros(4096, np.int64), return_grad=True)
        assert refused.value.reason == "CALL_TOO_COSTLY"
        assert refused.value.metadata["maxCallCost"] == "100000"
        with (
            pytest.raises(errors.ResourceExhaustedError),  # streamed: refused from its header
            LossClient(running.target, timeout=30, stream_threshold_bytes=0) as streaming,
        ):
            streaming.cross_entropy(big, np.zeros(4096, np.int64))
    assert engine.calls == computed
    # In a batch, the costly entry fails alone and the other computes.
    batch = pb.ComputeLossBatchRequest(
        requests=[
            build_request("cross_entropy", big, np.zeros(4096, np.int64)),
            build_request("cross_entropy", LOGITS, LABELS),
        ]
    )
    with grpc.insecure_channel(running.target, options=[("grpc.max_send_message_length", -1)]) as channel:
        answer = pb_grpc.LossServiceStub(channel).ComputeLossBatch(batch, timeout=30)
    assert [result.WhichOneof("result") for result in answer.results] == ["error", "response"]
    assert answer.results[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert engine.calls == computed + 1
    assert (
        _metric(running, "lossd_tenant_refusals_total", {"tenant": DEFAULT, "reason": "CALL_TOO_COSTLY"}) == 2
    )


def test_limits_refuse_with_a_pushback_the_client_honours(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    path = tmp_path / "tenants.toml"
    # 400 FLOPs a call: the bucket holds 1000, refilled at 1000 a second.
    write_tenants(path, {"team-a": {"token": "a", "max_cost_per_s": 1000}})
    running = server_factory(tenants_file=str(path))
    with LossClient(running.target, timeout=30, token="a", retry_attempts=1) as once:
        for _ in range(2):
            once.cross_entropy(LOGITS, LABELS)
        with pytest.raises(errors.ResourceExhaustedError) as refused:
            once.cross_entropy(LOGITS, LABELS)
    assert refused.value.reason == "TENANT_COST_RATE" and refused.value.retry_after is not None
    assert 0.0 < refused.value.retry_after <= 0.4
    time.sleep(1.1)
    with LossClient(running.target, timeout=30, token="a") as retrying:
        began = time.monotonic()
        for _ in range(4):  # the last two wait for the pushback, then pass
            retrying.cross_entropy(LOGITS, LABELS)
        assert time.monotonic() - began >= 0.3
    assert (
        _metric(running, "lossd_tenant_refusals_total", {"tenant": "team-a", "reason": "TENANT_COST_RATE"})
        >= 3
    )


def test_refusals_carry_grpc_retry_pushback() -> None:
    def trailers(error: ResourceExhaustedError) -> dict[str, Any]:
        return dict(rich_status(error)[2])

    admission = Admission()
    tenant = Tenant("a", max_concurrent_calls=1, max_inflight_bytes=100)
    account = admission.enter(tenant)
    with pytest.raises(ResourceExhaustedError) as calls:
        admission.enter(tenant)
    assert calls.value.reason == "TENANT_CALLS" and trailers(calls.value)[PUSHBACK_KEY] == "50"
    admission.leave(account)
    with pytest.raises(ResourceExhaustedError) as memory:
        Account(tenant, inflight_bytes=90).check_bytes(20)
    assert memory.value.reason == "TENANT_MEMORY" and trailers(memory.value)[PUSHBACK_KEY] == "100"
    with pytest.raises(ResourceExhaustedError) as alone:
        Account(tenant).check_bytes(200)  # could never fit: no retry
    assert trailers(alone.value)[PUSHBACK_KEY] == "-1"
    with pytest.raises(ResourceExhaustedError) as costly:
        Admission(10.0).check_cost(11.0)
    assert trailers(costly.value)[PUSHBACK_KEY] == "-1"


def test_a_tenants_concurrent_calls_are_limited(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    path = tmp_path / "tenants.toml"
    write_tenants(path, {"team-a": {"token": "a", "max_concurrent_calls": 1}, "team-b": {"token": "b"}})
    running = server_factory(SlowEngine(0.5), tenants_file=str(path))
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(_call, running.target, "a")
        time.sleep(0.2)
        second = pool.submit(_call, running.target, "a")
        other = pool.submit(_call, running.target, "b")
        assert second.result(timeout=30) == "RESOURCE_EXHAUSTED"
        assert first.result(timeout=30) == "OK" and other.result(timeout=30) == "OK"
    assert (
        _metric(running, "lossd_tenant_refusals_total", {"tenant": "team-a", "reason": "TENANT_CALLS"}) == 1
    )


# -- the fair queue --------------------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.hold = threading.Event()

    def run(self, items: list[str]) -> Sequence[str]:
        if items == ["hold"]:
            self.hold.wait(10)
        time.sleep(0.001 * len(items))
        self.batches.append(list(items))
        return [f"done {item}" for item in items]


def _batcher(recorder: _Recorder, **limits: Any) -> Batcher[str, str]:
    return Batcher(
        recorder.run,
        lambda item: item[0] if item[0] in "ab" else None,  # a's items merge, b's merge
        lambda item: (1, 1),
        BatchLimits(**limits),
        ThreadPoolExecutor(1),
        work=lambda item: MIN_WORK,
    )


async def _queue_then_release(
    batcher: Batcher[str, str], recorder: _Recorder, queued: Sequence[tuple[str, str, float]]
) -> list[str]:
    batcher.start()
    held = asyncio.ensure_future(batcher.submit("hold", tenant="x"))
    await asyncio.sleep(0.05)
    futures = []
    for item, tenant, weight in queued:
        futures.append(asyncio.ensure_future(batcher.submit(item, tenant=tenant, weight=weight)))
        await asyncio.sleep(0)
    recorder.hold.set()
    results = await asyncio.gather(held, *futures)
    await batcher.close()
    return list(results)


def test_the_fair_queue_serves_a_light_tenant_before_a_heavy_ones_backlog() -> None:
    recorder = _Recorder()
    batcher = _batcher(recorder, merge=False)
    queued = [(f"a{i}", "a", 1.0) for i in range(20)] + [("b0", "b", 1.0)]
    asyncio.run(_queue_then_release(batcher, recorder, queued))
    order = [batch[0] for batch in recorder.batches[1:]]
    assert order.index("b0") <= 2, order  # not behind a's 20


def test_weights_share_the_compute() -> None:
    recorder = _Recorder()
    batcher = _batcher(recorder, merge=False)
    queued = [(f"a{i}", "a", 3.0) for i in range(30)] + [(f"b{i}", "b", 1.0) for i in range(30)]
    asyncio.run(_queue_then_release(batcher, recorder, queued))
    first = [batch[0][0] for batch in recorder.batches[1:21]]
    assert 13 <= first.count("a") <= 17, first  # 3 : 1


def test_long_work_is_sliced_when_tenants_share_the_lane() -> None:
    recorder = _Recorder()
    batcher = _batcher(recorder)
    queued = [(f"a{i}", "a", 1.0) for i in range(200)] + [("b0", "b", 1.0)]

    async def run() -> None:
        batcher.start()
        for _ in range(3):  # measure the compute (a slice needs an estimate)
            await batcher.submit("b-warm", tenant="b")
        await _queue_then_release(batcher, recorder, queued)

    asyncio.run(run())
    sizes = [len(batch) for batch in recorder.batches if batch[0].startswith("a")]
    assert max(sizes) < 200 and sum(sizes) == 200, sizes
    b_at = next(i for i, batch in enumerate(recorder.batches) if "b0" in batch)
    a_batches = [i for i, batch in enumerate(recorder.batches) if batch[0].startswith("a")]
    assert b_at < a_batches[-1]


def test_each_tenant_may_hold_its_share_of_a_full_queue() -> None:
    recorder = _Recorder()
    batcher = _batcher(recorder, merge=False, max_queue_size=10)

    async def run() -> None:
        batcher.start()
        held = asyncio.ensure_future(batcher.submit("hold", tenant="x"))
        await asyncio.sleep(0.05)
        a = [batcher.enqueue(f"a{i}", tenant="a") for i in range(10)]
        with pytest.raises(ResourceExhaustedError):
            batcher.enqueue("a10", tenant="a")
        b = batcher.enqueue("b0", tenant="b")  # b holds nothing: it still gets in
        assert batcher.tenant_depth("b") == 1
        recorder.hold.set()
        await asyncio.gather(held, *a, b)
        await batcher.close()

    asyncio.run(run())


# -- quiet cancels, metrics ------------------------------------------------------------------------


def test_a_cancelled_call_is_logged_once_at_info_without_a_traceback(
    server_factory: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    running = server_factory(SlowEngine(0.5))
    request = build_request("cross_entropy", LOGITS, LABELS).SerializeToString()
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(running.target) as channel:
        method = channel.unary_unary("/lossd.v1.LossService/ComputeLoss")
        for _ in range(5):
            future = method.future(request, timeout=30)
            time.sleep(0.1)
            future.cancel()
    time.sleep(1.5)
    cancels = [r for r in caplog.records if "cancelled" in r.getMessage() and r.name.startswith("lossd")]
    assert len(cancels) == 5 and all(r.levelno == logging.INFO and r.exc_info is None for r in cancels)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert _metric(running, "lossd_tenant_calls_total", {"tenant": DEFAULT, "code": "CANCELLED"}) == 5


def test_metrics_by_tenant_name_never_a_token(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    path = tmp_path / "tenants.toml"
    write_tenants(path, {"team-a": {"token": "secret-token-a"}})
    port = free_port()
    running = server_factory(tenants_file=str(path), metrics_port=port)
    assert _call(running.target, "secret-token-a") == "OK"
    assert _call(running.target, "guessed-token") == "UNAUTHENTICATED"
    began = time.monotonic()
    while True:  # the tenants' gauges and cost are brought up to date once a second
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if "lossd_tenant_cost_flops_total" in text or time.monotonic() - began > 10:
            break
        time.sleep(0.2)
    tenants = {
        line.split('tenant="', 1)[1].split('"', 1)[0] for line in text.splitlines() if 'tenant="' in line
    }
    assert tenants <= {"team-a", "default", "unauthenticated"} and "team-a" in tenants
    assert (
        "secret-token-a" not in text
        and "guessed-token" not in text
        and digest("secret-token-a")[7:] not in text
    )
    for name in (
        "lossd_tenant_calls_total",
        "lossd_tenant_cost_flops_total",
        "lossd_queue_wait_seconds_bucket",
        "lossd_tenant_refusals_total",
        "lossd_tenant_inflight_bytes",
    ):
        assert name in text, name


# -- early refusal ---------------------------------------------------------------------------------


def test_typed_contents_are_reserved_before_they_are_parsed(
    server_factory: Callable[..., RunningServer],
) -> None:
    from lossd.server.rpc.open_inference import TYPED_EXPANSION, typed_bytes
    from lossd.v1.oip import open_inference_pb2 as oip
    from lossd.v1.oip import open_inference_pb2_grpc as oip_grpc

    def infer(dtype: str, values: np.ndarray) -> oip.ModelInferRequest:
        request = oip.ModelInferRequest(model_name="cross_entropy")
        given = request.inputs.add(name="input", datatype="FP32", shape=[len(values) // 8, 8])
        if dtype == "FP32":
            given.contents.fp32_contents.extend(values.astype(np.float32))
        else:  # INT64 values of one byte each: 16 bytes parsed per byte received
            given.datatype = "INT64"
            given.contents.int64_contents.extend(values.astype(np.int64))
        labels = request.inputs.add(name="target", datatype="INT64", shape=[len(values) // 8])
        labels.contents.int64_contents.extend(np.zeros(len(values) // 8, np.int64))
        return request

    floats = infer("FP32", np.zeros(1 << 20))
    raw = floats.SerializeToString()
    assert 2 * (4 << 20) <= typed_bytes(raw) <= 3 * len(raw)  # floats twice, the labels more
    ints = infer("INT64", np.ones(1 << 22)).SerializeToString()
    assert typed_bytes(ints) >= TYPED_EXPANSION * (4 << 20)
    assert typed_bytes(b"\x08\x01" * 5000) == TYPED_EXPANSION * 10000  # more fields than any client sends
    running = server_factory(max_memory_bytes=128 << 20)
    with grpc.insecure_channel(running.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(oip.ModelInferRequest.FromString(ints), timeout=30)
    error = from_rpc_error(refused.value)
    assert error.code == "RESOURCE_EXHAUSTED" and error.reason == "MEMORY_EXHAUSTED", error.message
    assert "parsing this call's message" in error.message
