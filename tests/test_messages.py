"""`lossd.wire.messages` and the one-copy request path built on it: a large request's tensors are
views of the received bytes, the rest parses as protobuf would parse it, and messages no client
makes (malformed, or hostile with countless tiny fields) are refused or parsed by protobuf whole."""

from __future__ import annotations

import numpy as np
import pytest

from lossd.client._calls import prepare_call
from lossd.client.errors import InvalidArgumentError
from lossd.server.rpc import requests
from lossd.v1 import loss_service_pb2 as pb
from lossd.wire import messages


def _large_request() -> bytes:
    rows, classes = 64, 512  # 128 KiB of logits: above SPLIT_BYTES
    logits = np.random.default_rng(0).standard_normal((rows, classes)).astype(np.float32)
    call = prepare_call(
        "cross_entropy",
        logits,
        np.arange(rows) % classes,
        weight=np.linspace(0.5, 1.5, classes, dtype=np.float32),
        label_smoothing=0.1,
        return_grad=True,
        grad_output=np.float32(2.0),
    )
    raw = call.unary().SerializeToString()
    assert len(raw) >= requests.SPLIT_BYTES
    return raw


def test_a_large_request_is_read_as_views_of_the_received_bytes() -> None:
    raw = _large_request()
    request, data = requests.read_request(raw)
    assert set(data) == {"input", "target", "cross_entropy.weight", "gradients.grad_output"}
    assert all(view.obj is raw for view in data.values())  # views, no copies
    expected = pb.ComputeLossRequest.FromString(raw)
    for field, view in data.items():
        holder = expected
        for name in field.split("."):
            holder = getattr(holder, name)
        assert bytes(view) == holder.data, field
    expected.input.ClearField("data")
    expected.target.ClearField("data")
    expected.cross_entropy.weight.ClearField("data")
    expected.gradients.grad_output.ClearField("data")
    assert request == expected


def test_the_last_of_a_repeated_singular_field_wins_as_in_protobuf() -> None:
    raw = _large_request()
    again = pb.ComputeLossRequest(input=pb.ComputeLossRequest.FromString(raw).input)
    again.input.data = b"\x01" * len(again.input.data)
    doubled = raw + again.SerializeToString()  # a second `input`: protobuf merges, last data wins
    _, data = requests.read_request(doubled)
    assert bytes(data["input"]) == pb.ComputeLossRequest.FromString(doubled).input.data


def test_a_message_of_countless_tiny_fields_is_parsed_by_protobuf_whole() -> None:
    """Unknown varint fields are legal protobuf; walking 100,000 of them in Python would cost a
    client-chosen amount of server time, so past MAX_FIELDS the parse is protobuf's own."""
    raw = _large_request() + b"\xf8\x3f\x01" * 100_000  # field 1023, varint 1, repeated
    with pytest.raises(messages.TooManyFields):
        messages.split(raw, {1: {3: True}})
    request, data = requests.read_request(raw)
    assert data == {}
    assert request.input.data == pb.ComputeLossRequest.FromString(raw).input.data


@pytest.mark.parametrize("cut", [1, 7, 1000])
def test_a_truncated_large_request_is_malformed(cut: int) -> None:
    raw = _large_request()[:-cut]
    with pytest.raises(InvalidArgumentError) as refused:
        requests.read_request(raw)
    assert refused.value.reason == "REQUEST_MALFORMED"
    assert "lossd.v1.ComputeLossRequest" in refused.value.message


def test_a_large_message_that_is_not_tensor_bytes_is_parsed_whole() -> None:
    """Splitting would save nothing and hold the remainder as a third copy: protobuf parses it."""
    small = prepare_call("nll_loss", np.zeros((2, 3), np.float32), np.zeros(2, np.int64)).unary()
    raw = small.SerializeToString() + messages.bytes_field(999, b"\0" * (1 << 20))[0]
    raw += messages.varint(1 << 20) + b"\0" * (1 << 20)  # field 999: 1 MiB of unknown bytes
    request, data = requests.read_request(raw)
    assert data == {}
    assert request.input.data == small.input.data
