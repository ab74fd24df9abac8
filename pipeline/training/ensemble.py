"""The checkpoint ensemble: saving and loading checkpoints, and predicting with the top-k.

Shared by train (writes it), evaluate, pseudolabel, tune (read it) and clean (predicts with its
K-fold models). Checkpoints load with weights_only=True: a pickled object is refused.
`predict_packed` predicts over a packed image folder in one process or, spread by
pipeline/core/processes.py, in several (evaluate.nproc, pseudolabel.nproc).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import ClusterConfig, ModelConfig
from pipeline.core.device import pick_device, to_input
from pipeline.core.errors import PipelineError
from pipeline.core.io import Rows, atomic_path, read_array, read_json, write_json
from pipeline.core.processes import block, job_folder, part_of, spread, usable
from pipeline.core.typed import parse
from pipeline.training.calibration import apply_temperature
from pipeline.training.model import ResNet, build_model

PREDICT_BATCH = 1024  # images per forward pass when predicting


@torch.inference_mode()
def predict_proba(
    models: list[nn.Module],
    images: np.ndarray,
    device: torch.device,
    batch_size: int = PREDICT_BATCH,
    *,
    members: bool = False,
    embeddings: bool = False,
):
    """Average softmax of `models` over images (N, H, W, C), streamed in chunks.

    Returns probs (N, K); with members, also each model's probs (M, N, K); with embeddings,
    also the averaged penultimate features (N, D).
    """
    for m in models:
        m.eval()
    outs, member_outs, embeds = [], [], []
    for start in range(0, len(images), batch_size):
        x = to_input(
            torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])), device
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats = shared_embeddings(models, x)
            logits = [m.head(f).float() for m, f in zip(models, feats)]
        per_model = torch.stack([F.softmax(z, dim=1) for z in logits])
        outs.append(per_model.mean(0).cpu())
        if members:
            member_outs.append(per_model.cpu())
        if embeddings:
            embeds.append(torch.stack(feats).mean(0).float().cpu())
    k = models[0].head.out_features
    probs = torch.cat(outs).numpy() if outs else np.zeros((0, k), np.float32)
    result = [probs]
    if members:
        result.append(
            torch.cat(member_outs, dim=1).numpy() if member_outs else np.zeros((len(models), 0, k))
        )
    if embeddings:
        dim = models[0].embedding_dim
        result.append(torch.cat(embeds).numpy() if embeds else np.zeros((0, dim), np.float32))
    return result[0] if len(result) == 1 else tuple(result)


def shared_embeddings(models: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Each model's embed(x); members that share one body (a frozen backbone's checkpoints,
    load_ensemble) run it once."""
    done: dict[int, torch.Tensor] = {}
    out = []
    for m in models:
        key = id(getattr(m, "body", m))
        if key not in done:
            done[key] = m.embed(x)
        out.append(done[key])
    return out


def save_torch(path: Path, obj: dict) -> None:
    """torch.save, atomically. Serialized in memory first: torch's own file writer reports a
    full disk as a RuntimeError without the path, a plain write reports it as an OSError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def save_checkpoint(path: Path, model: nn.Module, meta: dict) -> None:
    save_torch(path, {"state_dict": model.state_dict(), "meta": meta})


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code with an UnpicklingError
        raise PipelineError(
            f"refusing to load {path}: not a plain weights checkpoint ({type(exc).__name__})"
        ) from None


@dataclass
class Ensemble:
    models: list[ResNet]
    classes: list[str]
    info: dict
    folder: Path | None = None  # where load_ensemble read it: processes that predict load it there

    @property
    def temperature(self) -> float:
        return float(self.info.get("temperature", 1.0))

    def predict(self, images, device: torch.device | None = None, *, calibrated: bool = True, **kw):
        """predict_proba of the members; the averaged probabilities are temperature-scaled
        unless calibrated=False (members' own probabilities never are)."""
        device = device or pick_device()
        for m in self.models:
            m.to(device)
        out = predict_proba(self.models, images, device, **kw)
        t = self.temperature if calibrated else 1.0
        if isinstance(out, tuple):
            return (apply_temperature(out[0], t), *out[1:])
        return apply_temperature(out, t)


def load_ensemble(model_dir: Path) -> Ensemble:
    """The top-k checkpoints a train run kept, ready to predict."""
    model_dir = Path(model_dir)
    if not (model_dir / "ensemble.json").is_file():
        raise PipelineError(
            f"missing input {model_dir / 'ensemble.json'}: run the train stage first"
        )
    info = read_json(model_dir / "ensemble.json")
    cfg = parse(ModelConfig, info["model"], "ensemble.json model")
    models = []
    for member in info["members"]:
        ckpt = load_checkpoint(model_dir / member["file"])
        model = build_model(
            cfg, info["channels"], len(info["classes"]), input_px=info.get("input_px", 0)
        )
        model.load_state_dict(ckpt["state_dict"])
        if cfg.frozen and models and _same(models[0].body, model.body):
            model.body = models[0].body  # one forward pass of the body for every member
        models.append(model)
    return Ensemble(models, info["classes"], info, model_dir)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def predict_packed(
    ensemble: Ensemble,
    images: Path,
    rows: np.ndarray | None = None,
    *,
    nproc: int = 1,
    beside: Path | None = None,
    batch_size: int = PREDICT_BATCH,
    calibrated: bool = True,
    members: bool = False,
    embeddings: bool = False,
    cluster: ClusterConfig | None = None,
):
    """Ensemble.predict over a packed image folder, or its `rows`, streamed: probs (N, K), and
    with members (M, N, K), with embeddings (N, D).

    With cluster.engine ray, Ray Data workers predict it (pipeline/training/ray_predict.py);
    nproc is then unused.

    With nproc > 1, as many processes under torchrun each predict a contiguous block of whole
    batches (processes.block) and this process gathers them: the batches one process makes, so
    on a CPU the same numbers bit for bit. Their job folder is made beside `beside` (a path in
    the stage's own output folder), else in the temp folder.
    """
    packed = read_array(images)
    view = packed if rows is None else Rows(packed, rows)
    options = {"calibrated": calibrated, "members": members, "embeddings": embeddings}
    if cluster is not None and cluster.engine == "ray" and len(view):
        from pipeline.training.ray_predict import predict_on_ray

        if ensemble.folder is None:
            raise ValueError("Ray workers load the ensemble: use one from load_ensemble")
        every = np.arange(len(packed)) if rows is None else np.asarray(rows, np.int64)
        return predict_on_ray(
            cluster, ensemble.folder, images, every, batch_size=batch_size, options=options
        )
    nproc = usable(min(nproc, -(-len(view) // batch_size)))  # a process per batch at most
    if nproc <= 1:
        return ensemble.predict(view, batch_size=batch_size, **options)
    if ensemble.folder is None:
        raise ValueError("several processes load the ensemble: use one from load_ensemble")
    with job_folder(beside) as job:
        if rows is not None:
            np.save(job / "rows.npy", np.asarray(rows, np.int64))
        write_json(
            job / "job.json",
            {"model": str(ensemble.folder), "images": str(images), "batch_size": batch_size}
            | options,
        )
        spread(nproc, "predict-part", job, "prediction")
        parts = []
        for rank in range(nproc):
            with np.load(job / f"part-{rank:03d}.npz") as part:
                parts.append({name: part[name] for name in part.files})
        out = [np.concatenate([p["probs"] for p in parts])]
        if members:  # (M, N, K): rows are the second axis
            out.append(np.concatenate([p["members"] for p in parts], axis=1))
        if embeddings:
            out.append(np.concatenate([p["embeddings"] for p in parts]))
    return out[0] if len(out) == 1 else tuple(out)


def predict_part(job: Path) -> None:
    """One process's block of predict_packed's rows, saved as job/part-<rank>.npz."""
    with part_of(job) as (rank, world):
        spec = read_json(job / "job.json")
        packed = read_array(spec["images"])
        rows = np.load(job / "rows.npy") if (job / "rows.npy").is_file() else np.arange(len(packed))
        mine = rows[block(len(rows), spec["batch_size"], rank, world)]
        out = load_ensemble(Path(spec["model"])).predict(
            Rows(packed, mine),
            pick_device(),
            calibrated=spec["calibrated"],
            members=spec["members"],
            embeddings=spec["embeddings"],
            batch_size=spec["batch_size"],
        )
        names = ["probs"] + [k for k in ("members", "embeddings") if spec[k]]
        arrays = dict(zip(names, out if isinstance(out, tuple) else (out,)))
        np.savez(job / f"part-{rank:03d}.npz", **arrays)
