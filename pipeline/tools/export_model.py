"""export-model: a round's checkpoint ensemble as one ONNX graph that others can load.

    python -m pipeline export-model DEST [--round rN]

DEST/model.onnx takes images as ingest packs them, uint8 (N, H, W, C) at the ensemble's size
and channels (decode a file as docs/input-contract.md says: EXIF orientation, mode, `pad` or
`stretch` to image_size), and returns the ensemble's calibrated probabilities (N, K). Inside
the graph: the model input scaling (core/device.py to_input), each member's softmax, their
mean, and the temperature (training/calibration.py apply_temperature). DEST/model.json holds
what a caller needs besides: class names, input size, channels, resize policy, layout and
scaling, temperature, the members, the round and the git commit the model came from.
Needs the `onnx` extra (pip install -e '.[onnx]').
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import Params
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path, write_json
from pipeline.training.ensemble import load_ensemble, shared_embeddings

log = logging.getLogger(__name__)

OPSET = 18


class EnsembleGraph(nn.Module):
    """uint8 images (N, H, W, C) -> the ensemble's calibrated probabilities (N, K)."""

    def __init__(self, models: list[nn.Module], temperature: float):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # as device.to_input scales
        feats = shared_embeddings(list(self.members), x)  # a shared frozen body runs once
        probs = torch.stack([F.softmax(m.head(f), dim=1) for m, f in zip(self.members, feats)])
        probs = probs.mean(0)
        if self.temperature == 1.0:
            return probs
        return F.softmax(torch.log(probs.clamp_min(1e-12)) / self.temperature, dim=1)


def run(model_dir: Path, dest: Path, params: Params, round_name: str = "") -> dict:
    """Write DEST/model.onnx and DEST/model.json; returns the JSON."""
    try:
        import onnx  # noqa: F401 - the exporter needs it; say so before any work
        import onnxscript  # noqa: F401
    except ImportError:
        raise PipelineError("export-model needs the onnx extra: pip install -e '.[onnx]'") from None
    ensemble = load_ensemble(model_dir)
    size, channels = int(ensemble.info["image_size"]), int(ensemble.info["channels"])
    graph = EnsembleGraph(ensemble.models, ensemble.temperature).eval()
    example = torch.zeros((2, size, size, channels), dtype=torch.uint8)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest / "model.onnx") as tmp:
        program = torch.onnx.export(
            graph,
            (example,),
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            input_names=["images"],
            output_names=["probabilities"],
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
        program.save(str(tmp))
    info = {
        "classes": ensemble.classes,
        "input": {
            "name": "images",
            "dtype": "uint8",
            "layout": "NHWC",
            "image_size": size,
            "channels": channels,
            "resize": params.base.resize,
            "scaling": "inside the graph: x / 127.5 - 1",
        },
        "output": {"name": "probabilities", "calibrated": True},
        "temperature": ensemble.temperature,
        "members": [m["file"] for m in ensemble.info["members"]],
        "round": round_name,
        "commit": _commit(),
        "opset": OPSET,
    }
    write_json(dest / "model.json", info)
    log.info("export-model: %d members, %d classes -> %s", len(ensemble.models),
             len(ensemble.classes), dest / "model.onnx")  # fmt: skip
    return info


def _commit() -> str:
    """The git commit the workspace is at ("" outside a git repository)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""
