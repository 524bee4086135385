"""Prometheus metrics: values read back from the injected registry, the HTTP endpoint, a real Prometheus
scraping lossd and answering PromQL, and the aggregate of `lossd serve --workers 2`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from lossd.client import LossClient, errors

from conftest import RunningServer
from processes import free_port

LOGITS = np.random.default_rng(5).standard_normal((8, 4)).astype(np.float32)
LABELS = np.array([0, 1, 2, 3, 0, 1, 2, 3])


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, value = line.rsplit(" ", 1)
        if metric.split("{")[0] != name:
            continue
        found = (
            dict(part.split("=", 1) for part in metric[len(name) + 1 : -1].split(",") if "=" in part)
            if "{" in metric
            else {}
        )
        if all(found.get(k, "").strip('"') == v for k, v in labels.items()):
            return float(value)
    return None


def test_request_batch_and_byte_metrics(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory()
    registry = running.server.metrics.registry
    with LossClient(running.target, timeout=30) as client:
        for _ in range(5):
            client.cross_entropy(LOGITS, LABELS, return_grad=True)
        client.kl_div(np.log(np.full((2, 3), 1 / 3)), np.full((2, 3), 1 / 3))
        for _ in range(2):
            with pytest.raises(errors.InvalidArgumentError):
                client.nll_loss(LOGITS, LABELS + 10)
    value = registry.get_sample_value
    assert value("lossd_requests_total", {"loss": "cross_entropy", "code": "OK"}) == 5
    assert value("lossd_requests_total", {"loss": "kl_div", "code": "OK"}) == 1
    assert value("lossd_requests_total", {"loss": "nll_loss", "code": "INVALID_ARGUMENT"}) == 2
    assert value("lossd_request_duration_seconds_count", {"loss": "cross_entropy"}) == 5
    assert value("lossd_request_duration_seconds_sum", {"loss": "cross_entropy"}) > 0
    assert value("lossd_batch_requests_sum") == 6  # invalid requests never reach the batcher
    assert value("lossd_batch_rows_sum") == 5 * 8 + 6  # rows: 8 per CE request, 6 elements of KL
    assert value("lossd_queue_wait_seconds_count", {"tenant": "default"}) == 6
    assert value("lossd_compute_duration_seconds_count") == value("lossd_batch_requests_count")
    assert value("lossd_received_bytes_total") > 5 * LOGITS.nbytes
    assert value("lossd_sent_bytes_total") > 5 * LOGITS.nbytes  # the gradients
    assert value("lossd_queue_depth") == 0
    assert value("lossd_in_flight_requests") == 0
    import torch

    build = {
        "version": "0.1.0",
        "torch": torch.__version__,
        "grpcio": __import__("grpc").__version__,
        "device": "cpu",
    }
    assert value("lossd_build_info", build) == 1
    assert (
        value("lossd_device_memory_allocated_bytes") is None
        or value("lossd_device_memory_allocated_bytes") == 0
    )


def test_metrics_endpoint_serves_them(server_factory: Callable[..., RunningServer]) -> None:
    port = free_port()
    running = server_factory(metrics_port=port)
    with LossClient(running.target, timeout=30) as client:
        client.cross_entropy(LOGITS, LABELS)
    text = _scrape(port)
    assert _sample(text, "lossd_requests_total", loss="cross_entropy", code="OK") == 1
    assert "# TYPE lossd_request_duration_seconds histogram" in text
    assert "tensor" not in text.lower().replace("tensors", "")  # no tensor data on the metrics port


# -- a real Prometheus ------------------------------------------------------------------------------

PROMETHEUS = shutil.which("prometheus")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """Starts Prometheus scraping 127.0.0.1:<port> every 0.5 s; yields a function that starts it."""
    if PROMETHEUS is None:
        if os.environ.get("LOSSD_REQUIRE_PROMETHEUS"):
            pytest.fail("prometheus is not installed, and this run requires it (.ci/run installs it)")
        pytest.skip("prometheus is not installed (Debian package 'prometheus'; .ci/run installs it)")
    processes: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 500ms, evaluation_interval: 500ms}\n"
            "scrape_configs:\n"
            f"  - job_name: lossd\n    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        )
        port = free_port()
        processes.append(
            subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        return f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        process.terminate()
        process.wait(30)


def _promql(base: str, query: str) -> list[dict[str, object]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def _wait_for(base: str, query: str, expected: float, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = _promql(base, query)
        except OSError:  # not up yet
            result = []
        if result:
            last = float(result[0]["value"][1])  # type: ignore[index]
            if last == expected:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{query} = {last}, expected {expected}")


def _expected_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile: linear interpolation inside the bucket that holds rank q."""
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    raise AssertionError("rank beyond the last bucket")


def test_prometheus_scrapes_lossd_and_answers_promql(
    server_factory: Callable[..., RunningServer], prometheus: Callable[[int], str]
) -> None:
    metrics_port = free_port()
    running = server_factory(metrics_port=metrics_port)
    with LossClient(running.target, timeout=30) as client:
        for _ in range(7):
            client.cross_entropy(LOGITS, LABELS, return_grad=True)
        with pytest.raises(errors.InvalidArgumentError):
            client.cross_entropy(LOGITS, LABELS[:3])
    base = prometheus(metrics_port)
    assert _wait_for(base, 'lossd_requests_total{loss="cross_entropy",code="OK"}', 7.0) == 7.0
    assert _wait_for(base, 'sum(lossd_requests_total{code="INVALID_ARGUMENT"})', 1.0) == 1.0
    registry = running.server.metrics.registry
    buckets = []
    for metric in registry.collect():
        if metric.name == "lossd_request_duration_seconds":
            buckets = sorted(
                (float(s.labels["le"]), s.value)
                for s in metric.samples
                if s.name.endswith("_bucket")
                and s.labels["loss"] == "cross_entropy"
                and s.labels["le"] != "+Inf"
            )
    expected = _expected_quantile(0.5, buckets)
    query = (
        'histogram_quantile(0.5, sum by (le) (lossd_request_duration_seconds_bucket{loss="cross_entropy"}))'
    )
    (answer,) = _promql(base, query)
    assert float(answer["value"][1]) == pytest.approx(expected, rel=1e-9)  # type: ignore[index]
    assert 0 < expected < 5


# -- several workers --------------------------------------------------------------------------------


def test_workers_share_the_port_and_their_metrics_add_up(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lossd.server",
            "serve",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--device",
            "cpu",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = 0
        deadline = time.monotonic() + 120
        assert process.stderr is not None
        while started < 2 and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line, "the server exited"
            started += "serving lossd.v1.LossService" in line and "worker" in line
        sent = 0
        for _ in range(8):  # separate connections, so SO_REUSEPORT spreads them over the workers
            with LossClient(f"127.0.0.1:{port}", timeout=30) as client:
                for _ in range(5):
                    client.cross_entropy(LOGITS, LABELS)
                    sent += 1
        text = _scrape(metrics_port)
        assert _sample(text, "lossd_requests_total", loss="cross_entropy", code="OK") == sent
        assert _sample(text, "lossd_batch_requests_sum") == sent
        assert _sample(text, "lossd_in_flight_requests") == 0
        assert _sample(text, "lossd_build_info", device="cpu") == 1
    finally:
        process.terminate()
        _, rest = process.communicate(timeout=60)
    assert process.returncode == 0, rest
    assert rest.count("lossd stopped") == 2


def test_device_memory_is_read_off_the_event_loop_once_a_second() -> None:
    """Each read builds torch's whole allocator statistics: a thread of its own reads it on a clock,
    never a batch on the event loop."""
    from prometheus_client import CollectorRegistry

    from lossd.server.metrics import ServerMetrics

    readers: list[str] = []

    def probe() -> tuple[int, int]:
        readers.append(threading.current_thread().name)
        return (len(readers), 2 * len(readers))

    observed = ServerMetrics(CollectorRegistry(), build={"version": "x"}, device_memory=probe)
    for _ in range(50):
        observed.batch(1, 1, 0.001, [("default", 0.0)])
    assert readers == []
    stop = observed.watch_device_memory(interval_s=0.05)
    deadline = time.monotonic() + 30
    while len(readers) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop()
    count = len(readers)
    assert count >= 3 and set(readers) == {"lossd-device-memory"}
    time.sleep(0.2)
    assert len(readers) == count, "the watch stops"
    assert observed.registry.get_sample_value("lossd_device_memory_reserved_bytes") == 2 * count
    assert ServerMetrics(CollectorRegistry(), build={"version": "x"}).watch_device_memory() is not None
