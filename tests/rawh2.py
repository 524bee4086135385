"""A raw HTTP/2 gRPC caller, for what a gRPC client library will not send: partial messages,
declared lengths that lie, streams that stall, answers never read.

Used by the hostile-client tests and `benchmarks/hostile.py`; it talks only to loopback servers.
"""

from __future__ import annotations

import socket
import struct
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

__all__ = ["RawCall", "RawConnection", "grpc_frame"]


def grpc_frame(payload: bytes, declared: int | None = None) -> bytes:
    """gRPC's length-prefixed message: flag byte, 4-byte big-endian length, payload."""
    return struct.pack(">BI", 0, len(payload) if declared is None else declared) + payload


class RawCall:
    """One HTTP/2 stream of a `RawConnection`."""

    def __init__(self, connection: RawConnection, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.sent = 0
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.data = bytearray()
        self.ended = False
        self.reset = False

    def send(self, data: bytes, end: bool = False, timeout: float = 5.0) -> int:
        """Sends as much of `data` as flow control allows within `timeout`; returns the bytes sent."""
        return self.connection.send(self, data, end, timeout)

    @property
    def status(self) -> str | None:
        """grpc-status from the trailers (or trailers-only headers), if any arrived."""
        return self.trailers.get("grpc-status", self.headers.get("grpc-status"))

    @property
    def message(self) -> str:
        return self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))

    @property
    def done(self) -> bool:
        return self.ended or self.reset


class RawConnection:
    """A plaintext HTTP/2 connection speaking just enough gRPC."""

    def __init__(self, host: str, port: int, *, window: int | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.h2.initiate_connection()
        if window is not None:  # how much of our answers the server may send before we read them
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.calls: dict[int, RawCall] = {}
        self.authority = f"{host}:{port}"
        self._flush()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def open(self, method: str, metadata: dict[str, str] | None = None, read: bool = True) -> RawCall:
        """Opens a call to `/service/Method`. With `read=False` its answer is never consumed (no
        WINDOW_UPDATE), like a client that does not read."""
        stream_id = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *(metadata or {}).items(),
        ]
        self.h2.send_headers(stream_id, headers)
        self._flush()
        call = RawCall(self, stream_id)
        call.reading = read  # type: ignore[attr-defined]
        self.calls[stream_id] = call
        return call

    def send(self, call: RawCall, data: bytes, end: bool, timeout: float) -> int:
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        sent = 0
        while sent < len(view):
            if call.done:
                break
            window = min(self.h2.local_flow_control_window(call.stream_id), self.h2.max_outbound_frame_size)
            if window <= 0:
                if time.monotonic() >= deadline:
                    break
                self.pump(min(0.05, max(deadline - time.monotonic(), 0.001)))
                continue
            piece = view[sent : sent + window]
            try:
                self.h2.send_data(call.stream_id, piece.tobytes())
            except h2.exceptions.StreamClosedError:
                call.reset = True
                break
            sent += len(piece)
            self._flush()
        call.sent += sent
        if end and sent == len(view) and not call.done:
            self.h2.end_stream(call.stream_id)
            self._flush()
        return sent

    def pump(self, timeout: float) -> bool:
        """Reads what the server sent within `timeout`; False once the connection is closed."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except (TimeoutError, BlockingIOError):
            return True
        except OSError:
            return False
        if not data:
            return False
        for event in self.h2.receive_data(data):
            call = self.calls.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived) and call:
                call.headers.update(dict(event.headers))  # type: ignore[arg-type]
            elif isinstance(event, h2.events.TrailersReceived) and call:
                call.trailers.update(dict(event.headers))  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived) and call:
                if getattr(call, "reading", True):
                    call.data += event.data
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and call:
                call.ended = True
            elif isinstance(event, h2.events.StreamReset) and call:
                call.reset = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                for each in self.calls.values():
                    each.reset = True
        self._flush()
        return True

    def wait(self, calls: list[RawCall], timeout: float) -> bool:
        """Reads until every call in `calls` has ended, or `timeout`; True if all ended."""
        deadline = time.monotonic() + timeout
        while not all(call.done for call in calls):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.pump(min(remaining, 0.2)):
                break
        return all(call.done for call in calls)

    def close(self) -> None:
        try:
            self.h2.close_connection()
            self._flush()
        except Exception:
            pass
        self.sock.close()
