"""Calls lossd through Triton's own Python client (tritonclient.grpc), as a KServe v2 user would.

    python call_lossd.py HOST:PORT

Run in .venv-tritonclient (see requirements.txt), never in lossd's environment. Prints one JSON
object: the probes, the metadata, and each inference's inputs and outputs as float lists, for the
test to check against torch.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import ml_dtypes
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def _floats(array: Any) -> Any:
    return np.asarray(array).astype(np.float64).tolist()


def main() -> None:
    client = triton.InferenceServerClient(sys.argv[1])
    rng = np.random.default_rng(3)
    report: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "models_ready": {m: client.is_model_ready(m) for m in ("nll_loss", "cross_entropy", "kl_div")},
        "server": client.get_server_metadata(as_json=True),
        "cross_entropy_metadata": client.get_model_metadata("cross_entropy", as_json=True),
    }

    logits = rng.standard_normal((4, 5)).astype(np.float32)
    labels = np.array([0, 4, 2, 1], dtype=np.int64)
    inputs = [
        triton.InferInput("input", list(logits.shape), "FP32"),
        triton.InferInput("target", [4], "INT64"),
    ]
    inputs[0].set_data_from_numpy(logits)
    inputs[1].set_data_from_numpy(labels)
    outputs = [triton.InferRequestedOutput("loss"), triton.InferRequestedOutput("input_grad")]
    result = client.infer("cross_entropy", inputs, outputs=outputs, parameters={"label_smoothing": 0.1})
    report["cross_entropy"] = {
        "input": _floats(logits),
        "target": labels.tolist(),
        "loss": _floats(result.as_numpy("loss")),
        "loss_datatype": result.get_output("loss").datatype,
        "input_grad": _floats(result.as_numpy("input_grad")),
    }

    student = np.log(rng.dirichlet(np.ones(6), 3)).astype(ml_dtypes.bfloat16)
    teacher = rng.dirichlet(np.ones(6), 3).astype(ml_dtypes.bfloat16)
    inputs = [triton.InferInput("input", [3, 6], "BF16"), triton.InferInput("target", [3, 6], "BF16")]
    inputs[0].set_data_from_numpy(student)
    inputs[1].set_data_from_numpy(teacher)
    outputs = [triton.InferRequestedOutput(name) for name in ("loss", "input_grad", "target_grad")]
    result = client.infer("kl_div", inputs, outputs=outputs, parameters={"reduction": "batchmean"})
    report["kl_div"] = {
        "input": _floats(student),
        "target": _floats(teacher),
        **{name: _floats(result.as_numpy(name)) for name in ("loss", "input_grad", "target_grad")},
        "datatypes": [result.get_output(name).datatype for name in ("loss", "input_grad", "target_grad")],
    }

    log_probs = np.log(rng.dirichlet(np.ones(3), 5)).astype(np.float16)
    inputs = [triton.InferInput("input", [5, 3], "FP16"), triton.InferInput("target", [5], "INT64")]
    inputs[0].set_data_from_numpy(log_probs)
    inputs[1].set_data_from_numpy(np.array([0, 1, 2, 1, 0], dtype=np.int64))
    result = client.infer("nll_loss", inputs, parameters={"reduction": "none"})
    report["nll_loss"] = {"input": _floats(log_probs), "loss": _floats(result.as_numpy("loss"))}

    try:  # a class index out of range: lossd's message reaches the caller
        inputs[1].set_data_from_numpy(np.array([0, 1, 7, 1, 0], dtype=np.int64))
        client.infer("nll_loss", inputs)
        report["bad_target"] = "accepted"
    except InferenceServerException as error:
        report["bad_target"] = {"status": error.status(), "message": error.message()}
    try:
        client.get_model_metadata("resnet50")
        report["unknown_model"] = "found"
    except InferenceServerException as error:
        report["unknown_model"] = {"status": error.status(), "message": error.message()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
