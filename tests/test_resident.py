"""Resident tensors: uploaded once (PutTensor, in chunks), named by id wherever a request takes a
tensor, listed and deleted; held within --max-resident-bytes by policy; a server that does not hold
one answers NOT_FOUND and the client uploads it again by itself."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lossd.client import AsyncLossClient, LossClient, Resident, errors
from lossd.server.resident import ResidentInfo, ResidentStore
from lossd.server.tenants import Tenant
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd.v1 import tensor_pb2
from lossd.wire import codec
from lossd.wire.resident import content_id
from lossd.wire.status import from_rpc_error

from conftest import RunningServer


def test_the_id_is_the_documented_digest() -> None:
    import hashlib

    data = np.arange(12, dtype=np.float32).reshape(4, 3)
    wanted = "sha256:" + hashlib.sha256(b"float32:4,3:" + data.tobytes()).hexdigest()
    assert content_id(tensor_pb2.DATA_TYPE_FLOAT32, (4, 3), memoryview(data.tobytes())) == wanted
    assert Resident.of(data).id == wanted == Resident.of(torch.from_numpy(data)).id
    scalar = content_id(tensor_pb2.DATA_TYPE_INT64, (), memoryview(np.int64(3).tobytes()))
    assert scalar == "sha256:" + hashlib.sha256(b"int64::" + np.int64(3).tobytes()).hexdigest()


def test_a_resident_tensor_stands_in_anywhere(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory()
    logits, labels = torch.randn(16, 50), torch.randint(0, 50, (16,))
    weight = torch.rand(50)
    with LossClient(running.target, timeout=30, stream_chunk_bytes=1024) as client:
        held_weight = client.resident(weight)
        held_logits = client.resident(logits)
        assert client.resident(weight) is held_weight, "cached by content: no second upload"
        result = client.cross_entropy(held_logits, labels, held_weight)
        expected = F.cross_entropy(logits, labels, weight)
        assert torch.equal(torch.as_tensor(result.loss), expected)
        teacher = client.resident(torch.randn(16, 50))
        distilled = client.distillation(logits, teacher, return_grad=True)
        assert distilled.grad is not None and distilled.grad.shape == (16, 50)
        # streamed calls take them too
        with LossClient(running.target, timeout=30, stream_threshold_bytes=0) as streaming:
            streamed = streaming.cross_entropy(logits, labels, held_weight, return_grad=True)
        assert torch.equal(streamed.loss, expected)
    store = running.server.lifecycle.resident
    assert {info.id for info in store.list(Tenant("default"))} == {held_weight.id, held_logits.id, teacher.id}
    value = running.server.metrics.registry.get_sample_value
    assert value("lossd_resident_events_total", {"event": "upload"}) == 3
    assert value("lossd_resident_events_total", {"event": "hit"}) >= 4
    assert value("lossd_resident_tensors") == 3
    assert value("lossd_resident_bytes") == weight.nbytes + logits.nbytes + 16 * 50 * 4


def test_list_delete_and_not_found(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory()
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with LossClient(running.target, timeout=30) as client, grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        held = client.resident(logits)
        listed = stub.ListTensors(pb.ListTensorsRequest(), timeout=10)
        assert [t.id for t in listed.tensors] == [held.id]
        assert listed.tensors[0].shape == [4, 5] and listed.resident_bytes == logits.nbytes
        assert stub.DeleteTensor(pb.DeleteTensorRequest(id=held.id), timeout=10).deleted
        assert not stub.DeleteTensor(pb.DeleteTensorRequest(id=held.id), timeout=10).deleted
        # A raw request naming it now: NOT_FOUND with its reason and the id.
        request = pb.ComputeLossRequest()
        request.input.resident_id = held.id
        codec.encode(labels, "target", out=request.target)
        request.cross_entropy.SetInParent()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ComputeLoss(request, timeout=10)
        error = from_rpc_error(caught.value)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and error.reason == "RESIDENT_NOT_FOUND"
        assert error.field == "input.resident_id" and error.metadata == {"residentId": held.id}
        # The client uploads it again by itself and the call succeeds.
        result = client.cross_entropy(held, labels)
        assert torch.equal(torch.as_tensor(result.loss), F.cross_entropy(logits, labels))
        assert [t.id for t in stub.ListTensors(pb.ListTensorsRequest(), timeout=10).tensors] == [held.id]


def test_a_restarted_server_gets_it_again(server_factory: Callable[..., RunningServer]) -> None:
    """Another server (a replica, a restart) holds nothing: the client's handle still works."""
    first, second = server_factory(), server_factory()
    logits, labels = torch.randn(3, 4), torch.tensor([0, 1, 3])
    with LossClient(first.target, timeout=30) as client:
        held = client.resident(logits)
    with LossClient(second.target, timeout=30) as other:
        assert torch.equal(
            torch.as_tensor(other.cross_entropy(held, labels).loss), F.cross_entropy(logits, labels)
        )

    other_logits = torch.randn(3, 4)
    uploads = {"lossd_resident_events_total": {"event": "upload"}}

    async def run() -> tuple[object, float]:
        async with AsyncLossClient(second.target, timeout=30) as aio:
            again = await aio.resident(other_logits)
            assert await aio.delete_resident(again), "the server held it"
            before = _count(second, uploads)
            loss = (await aio.cross_entropy(again, labels, return_grad=True)).loss
            return loss, _count(second, uploads) - before

    loss, uploaded = asyncio.run(run())
    # The deleted tensor was uploaded again, by the asyncio client's own re-upload, and used.
    assert uploaded == 1
    assert torch.equal(torch.as_tensor(loss), F.cross_entropy(other_logits, labels))


def _count(running: RunningServer, metric: dict[str, dict[str, str]]) -> float:
    ((name, labels),) = metric.items()
    return running.server.metrics.registry.get_sample_value(name, labels) or 0.0


def test_errors(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(max_resident_bytes=1000, resident_policy="refuse")
    with LossClient(running.target, timeout=30) as client:
        with pytest.raises(errors.ResourceExhaustedError) as caught:
            client.resident(np.zeros(1000, np.float32))
        assert caught.value.reason == "RESIDENT_TOO_LARGE"
        client.resident(np.zeros(200, np.float32))
        with pytest.raises(errors.ResourceExhaustedError) as caught:
            client.resident(np.ones(100, np.float32))
        assert caught.value.reason == "RESIDENT_FULL"
        held = client.resident(np.zeros(200, np.float32))
        request = pb.ComputeLossRequest()
        request.input.resident_id = held.id
        request.input.shape[:] = [3, 3]
        codec.encode(np.array([0, 1, 2]), "target", out=request.target)
        request.cross_entropy.SetInParent()
        with pytest.raises(errors.InvalidArgumentError) as refused:
            client.compute(request)
        assert refused.value.reason == "RESIDENT_MISMATCH" and refused.value.field == "input"


def test_the_store_evicts_the_least_recently_used() -> None:
    events: list[str] = []
    store = ResidentStore(100, "lru", lambda tenant, event, mine, held, count: events.append(event))
    tenant = Tenant("default")

    def put(name: str, nbytes: int) -> None:
        store.put(tenant, torch.zeros(nbytes, dtype=torch.uint8), ResidentInfo(name, 7, (nbytes,), nbytes))

    put("a", 40)
    put("b", 40)
    store.get(tenant, "a", "input")  # a is now the most recently used
    put("c", 40)  # b goes
    assert [info.id for info in store.list(tenant)] == ["c", "a"] and store.held == 80
    assert events == ["upload", "upload", "hit", "eviction", "upload"]
    with pytest.raises(errors.NotFoundError) as caught:
        store.get(tenant, "b", "target")
    assert caught.value.reason == "RESIDENT_NOT_FOUND" and caught.value.field == "target.resident_id"
    put("a", 40)  # already held: nothing changes
    assert store.held == 80
    with pytest.raises(ValueError, match="fifo"):
        ResidentStore(10, "fifo")


def test_uploads_need_the_same_token_as_every_call(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(auth_token="s3cret")
    data = np.arange(6, dtype=np.float32)
    with LossClient(running.target, timeout=30) as anonymous:
        with pytest.raises(errors.LossdError) as caught:
            anonymous.resident(data)
        assert caught.value.code == "UNAUTHENTICATED"
    with LossClient(running.target, timeout=30, token="s3cret") as client:
        held = client.resident(data)
        assert held.id == Resident.of(data).id
        assert client.delete_resident(held)
    assert running.server.lifecycle.resident.list(Tenant("default")) == []
