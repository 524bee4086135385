"""Deployment files: the Kubernetes manifests (kubernetes-validate, and consistent with the image and
the server's drain), the Prometheus scrape config (promtool), and the Grafana dashboard, whose every
PromQL expression runs against a real Prometheus scraping a live lossd."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from kubernetes_validate import validate

from lossd.client import LossClient

from conftest import RunningServer
from processes import free_port
from test_metrics import _promql, prometheus  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
DASHBOARD = ROOT / "deploy" / "grafana" / "lossd-dashboard.json"


def _manifests() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


@pytest.mark.parametrize("version", ["1.37.0", "1.33.0"])
def test_the_manifests_validate(version: str) -> None:
    validated = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            validate(document, version, strict=True)  # raises on any error, unknown fields included
            validated.append(document["kind"])
    assert sorted(validated) == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]


def test_the_manifests_agree_with_the_image_and_the_drain() -> None:
    kinds = _manifests()
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= set(kinds)
    deployment, service = kinds["Deployment"], kinds["Service"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["grpc"] == int(env["LOSSD_PORT"]) and ports["metrics"] == int(env["LOSSD_METRICS_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == ports["metrics"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # SIGKILL must never cut a drain short: preStop, then the server's grace, within the period.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(env["LOSSD_SHUTDOWN_GRACE_S"])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + grace + 1
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"LOSSD_SHUTDOWN_GRACE_S={env['LOSSD_SHUTDOWN_GRACE_S']}" in dockerfile
    user = re.search(r"^USER (\d+)", dockerfile, re.M)
    assert user and pod["spec"]["securityContext"]["runAsUser"] == int(user.group(1))
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # Headless, so that DNS names every pod and clients balance per call.
    assert service["spec"]["clusterIP"] == "None"
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_the_prometheus_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    done = subprocess.run(
        [promtool, "check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]
    assert found and all(expr for _, expr in found)
    return found


def _concrete(expr: str) -> str:
    """A dashboard expression as Grafana sends it: variables replaced."""
    return expr.replace("$__rate_interval", "1m").replace('"$instance"', '".*"')


def test_every_dashboard_query_runs_against_a_live_lossd(
    server_factory: Callable[..., RunningServer],
    prometheus: Callable[[int], str],  # noqa: F811
) -> None:
    metrics_port = free_port()
    running = server_factory(metrics_port=metrics_port)
    base = prometheus(metrics_port)
    stop = threading.Event()
    logits = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)

    def traffic() -> None:
        with LossClient(running.target, timeout=30) as client:
            while not stop.is_set():
                client.cross_entropy(logits, np.arange(8) % 5, return_grad=True)
                time.sleep(0.01)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        request_rate = next(expr for title, expr in _expressions() if title == "Request rate")
        deadline = time.monotonic() + 60
        rate = 0.0
        while time.monotonic() < deadline and rate <= 0:
            time.sleep(0.5)
            try:
                result = _promql(base, _concrete(request_rate))
            except OSError:
                continue
            rate = sum(float(series["value"][1]) for series in result)  # type: ignore[index]
        assert rate > 0, "the request-rate panel shows no traffic"
        answered = {}
        for title, expr in _expressions():
            answered[f"{title}: {expr}"] = len(_promql(base, _concrete(expr)))  # raises unless success
    finally:
        stop.set()
        worker.join()
    with_data = [key for key, count in answered.items() if count]
    # CUDA memory, drops, retries, tenant refusals and resident bytes may be empty here.
    assert len(with_data) >= len(answered) - 10, answered
