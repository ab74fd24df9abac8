"""train stage: train.model on the cleaned table plus the round's pseudo-labels.

Reads   the cleaned training table and the validation table (clean stage) + packed images,
        classes.json, the augment stage's policy, the round's pseudo-label input folder
        (table.csv + images/: the accepted rows are trained on; none in r000)
Writes  <model>/epoch_NNN.pt + ensemble.json  the top-k checkpoints, averaged at prediction,
                                              and the temperature fitted on validation
        <report>/diagnostics.json, diagnostics.png, warnings.json, config.json, per_class.csv
        <live>/                                dvclive metrics and per-epoch plots
Params  base, train

With a frozen pretrained backbone (train.model.frozen) only the linear head trains, on features
the body computes once (pipeline/training/frozen.py: no augmentation, one process). Otherwise
the loop is pipeline/training/loop.py (`fit`: `train.epochs` epochs of at least
`train.min_steps` optimizer steps in all, early stopping, the top-k checkpoints, resume); the
ensemble, pipeline/training/ensemble.py. Batches come from pipeline/training/feed.py (either
augmentation backend); with train.nproc > 1 the command runs under torchrun and `fit` wraps the
model in DistributedDataParallel; with cluster.engine: ray, so do cluster.workers Ray Train
workers (`run_on_ray`).

With a timm backbone and train.fallback: resnet, the from-scratch CNN also trains on the
same rows, averaged down to FALLBACK_PX and augmented at that size (checkpoints in <state>/cnn;
at prediction the network averages the packed images down itself), and `choose` keeps
whichever ensemble scores higher on validation. ensemble.json,
config.json and the reports describe the kept one (ensemble.json's input_px: the CNN's);
diagnostics.json's summary holds kept_model, val_acc_backbone and val_acc_cnn; keeping the CNN
is a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.core.config import AugmentConfig, Params, with_image_shape
from pipeline.core.device import pick_device
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_dir, read_array, read_json, read_table, write_json, write_table
from pipeline.core.typed import parse, to_dict
from pipeline.reports import report
from pipeline.training.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    nll,
)
from pipeline.training.ensemble import load_ensemble
from pipeline.training.feed import Samples, distributed, training_augmentation
from pipeline.training.frozen import fit_head
from pipeline.training.gpu_augment import BatchAugment
from pipeline.training.loop import FitResult, fit, passes_per_epoch
from pipeline.training.model import FALLBACK_PX, build_model, downsample, fallback_cnn

log = logging.getLogger(__name__)


def fingerprint_of(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(
            part.tobytes()
            if isinstance(part, np.ndarray)
            else json.dumps(part, sort_keys=True).encode()
        )
    return digest.hexdigest()


def load_training_samples(
    table_path: Path,
    val_path: Path,
    images_path: Path,
    classes: list[str],
    pseudo_dir: Path | None,
    augment_dir: Path | None,
) -> tuple[Samples, Samples, pd.DataFrame]:
    """Cleaned human rows, offline copies and accepted pseudo-labels, in that order; the scored
    validation rows.

    Returns (train, val, counts): counts per class of human and pseudo-labeled training rows.
    """
    table, val_table = read_table(table_path), read_table(val_path)
    images = read_array(images_path)
    for path, t in ((table_path, table), (val_path, val_table)):
        unknown = sorted(set(t["label"]) - set(classes))
        if unknown:
            raise PipelineError(f"{path}: label {unknown[0]!r} is not in classes.json")
    overlap = set(table["id"]) & set(val_table["id"])  # scored or not
    if overlap:
        raise PipelineError(
            f"{table_path} holds validation rows ({sorted(overlap)[0]}): rerun clean"
        )
    val_table = val_table[val_table["scored"] == "True"]
    parts_x = [images[table["row"].astype(int).to_numpy()]]
    parts_y = [table["label"].map(classes.index).to_numpy(np.int64)]
    counts = pd.DataFrame(0, index=classes, columns=["human", "offline", "pseudo"])
    counts["human"] = table["label"].value_counts().reindex(classes, fill_value=0)
    if augment_dir is not None and (augment_dir / "offline" / "table.csv").is_file():
        offline = read_table(augment_dir / "offline" / "table.csv")
        offline = offline[offline["source_id"].isin(table["id"])]  # copies of training rows only
        if len(offline):
            parts_x.append(
                read_array(augment_dir / "offline" / "images.npy")[
                    offline["row"].astype(int).to_numpy()
                ]
            )
            parts_y.append(offline["label"].map(classes.index).to_numpy(np.int64))
            counts["offline"] = offline["label"].value_counts().reindex(classes, fill_value=0)
    if pseudo_dir is not None and (pseudo_dir / "table.csv").is_file():
        pseudo = read_table(pseudo_dir / "table.csv")
        pseudo = pseudo[(pseudo["accepted"] == "True") & pseudo["label"].isin(classes)]
        if len(pseudo):
            parts_x.append(read_array(pseudo_dir / "images")[pseudo["row"].astype(int).to_numpy()])
            parts_y.append(pseudo["label"].map(classes.index).to_numpy(np.int64))
            counts["pseudo"] = pseudo["label"].value_counts().reindex(classes, fill_value=0)
    train = Samples(np.concatenate(parts_x), np.concatenate(parts_y))
    val = Samples(
        np.ascontiguousarray(images[val_table["row"].astype(int).to_numpy()]),
        val_table["label"].map(classes.index).to_numpy(np.int64),
    )
    return train, val, counts


def run(
    *,
    table_path: Path,
    val_path: Path,
    images_path: Path,
    classes_path: Path,
    augment_dir: Path,
    pseudo_dir: Path | None,
    model_dir: Path,
    report_dir: Path,
    live_dir: Path,
    state_dir: Path,
    params: Params,
) -> dict:
    params = with_image_shape(params, read_array(images_path).shape)
    cfg, base = params.train, params.base
    classes = read_json(classes_path)
    train, val, per_class = load_training_samples(
        table_path, val_path, images_path, classes, pseudo_dir, augment_dir
    )
    counts = {k: int(v) for k, v in per_class.sum().items()} | {"val": len(val)}
    device = pick_device()
    saved = read_json(augment_dir / "params.json")["augment"]  # the policy the augment stage saved
    policy = parse(AugmentConfig, saved, f"{augment_dir / 'params.json'}: augment")
    augmentation = training_augmentation(
        policy, base, classes, device, transforms_dir=augment_dir / "transforms"
    )
    config = {"base": to_dict(base), "train": to_dict(cfg), "classes": classes, "counts": counts}
    log.info(
        "train: %d human + %d offline + %d pseudo images, %d validation, device %s, %s augmentation",
        counts["human"],
        counts["offline"],
        counts["pseudo"],
        counts["val"],
        device,
        "gpu" if isinstance(augmentation, BatchAugment) else "albumentations",
    )
    cnn = fallback_cnn(cfg)
    with distributed(device) as shard:
        torch.manual_seed(base.seed)
        model = build_model(cfg.model, base.channels, len(classes), pretrained=True)
        if cfg.model.frozen:  # a linear head on the pretrained body's features
            if params.cluster.engine == "ray":
                log.info("train: a frozen backbone's round trains in this process, not on Ray")
            result = fit_head(
                model, train, val, cfg, seed=base.seed, device=device, state_dir=state_dir
            )
        else:
            result = fit(
                model,
                train,
                val,
                cfg,
                seed=base.seed,
                device=device,
                augmentation=augmentation,
                state_dir=state_dir,
                fingerprint=fingerprint_of(config, train.images, train.labels, val.labels),
            )
        del model  # its checkpoints are on disk; the device's memory goes to the CNN
        if cnn is not None:  # the from-scratch CNN beside the backbone, on the same rows
            # It trains and augments at its own size, as it would alone; prediction averages
            # the packed images down inside the network.
            cnn_cfg = dataclasses.replace(cfg, model=cnn)
            small = dataclasses.replace(base, image_size=FALLBACK_PX)
            torch.manual_seed(base.seed)
            cnn_result = fit(
                build_model(cnn, base.channels, len(classes), input_px=FALLBACK_PX),
                Samples(downsample(train.images, FALLBACK_PX), train.labels),
                Samples(downsample(val.images, FALLBACK_PX), val.labels),
                cnn_cfg,
                seed=base.seed,
                device=device,
                augmentation=training_augmentation(policy, small, classes, device),
                state_dir=state_dir / "cnn",
                fingerprint=fingerprint_of(
                    config, to_dict(cnn), train.images, train.labels, val.labels
                ),
                desc="train (CNN beside the backbone)",
            )
    if shard.rank > 0:
        return {}  # the first process writes every output
    if not result.kept:
        raise PipelineError("training kept no checkpoint: the validation split is empty")

    common = {"classes": classes, "channels": base.channels, "image_size": base.image_size}
    source = state_dir  # where the kept model's checkpoints are
    info = assemble(source, result, {**common, "model": to_dict(cfg.model), "config": config})
    raw = load_ensemble(source).predict(val.images, device, calibrated=False)
    choice: dict = {}
    if cnn is not None:
        cnn_config = {**config, "train": to_dict(cnn_cfg), "input_px": FALLBACK_PX}
        cnn_info = {**common, "model": to_dict(cnn), "input_px": FALLBACK_PX}
        cnn_info = assemble(state_dir / "cnn", cnn_result, {**cnn_info, "config": cnn_config})
        cnn_raw = load_ensemble(state_dir / "cnn").predict(val.images, device, calibrated=False)
        choice = choose(cfg.model.backbone, val.labels, raw, cnn_raw)
        if choice["kept_model"] == "resnet":
            source, result, info, raw, config = (
                state_dir / "cnn",
                cnn_result,
                cnn_info,
                cnn_raw,
                cnn_config,
            )
            result.warnings.insert(0, choice["why"])

    with atomic_dir(model_dir) as tmp:
        for entry in result.kept:
            shutil.copy2(source / entry["file"], tmp / entry["file"])
        # Calibrate: one temperature for the averaged probabilities, fitted on validation.
        info["temperature"] = fit_temperature(val.labels, raw)
        write_json(tmp / "ensemble.json", info)
    calibrated = apply_temperature(raw, info["temperature"])
    summary = {
        "epochs_run": len(result.history),
        "passes_per_epoch": passes_per_epoch(cfg, len(train), cfg.epochs),
        "best_val_acc": max(h["val_acc"] for h in result.history),
        "ensemble_val_acc": float((raw.argmax(1) == val.labels).mean()),
        "ensemble_val_loss": nll(val.labels, calibrated),
        "temperature": info["temperature"],
        "val_ece_before": expected_calibration_error(val.labels, raw)[0],
        "val_ece_after": expected_calibration_error(val.labels, calibrated)[0],
        "train_size": len(train),
        **{f"train_size_{k}": v for k, v in counts.items()},
        **{k: v for k, v in choice.items() if k != "why"},
    }
    write_live(live_dir, result.history, summary)
    write_report(report_dir, result, config, summary, per_class)
    shutil.rmtree(state_dir, ignore_errors=True)
    log_outcome(summary, result.warnings, len(result.kept))
    return summary


def assemble(folder: Path, result: FitResult, info: dict) -> dict:
    """Write folder/ensemble.json for the checkpoints `result` kept there; returns it."""
    info = {"members": result.kept, **info}
    write_json(folder / "ensemble.json", info)
    return info


def choose(
    backbone: str, labels: np.ndarray, backbone_probs: np.ndarray, cnn_probs: np.ndarray
) -> dict:
    """The backbone's ensemble against the CNN's on the validation rows (labels (N,), each
    ensemble's probabilities (N, K)): the CNN is kept only when its accuracy is higher (a tie
    keeps the backbone, whose features cleaned the labels). Returns kept_model (the backbone's
    name or resnet), val_acc_backbone, val_acc_cnn and why, a sentence."""
    scores = {
        "val_acc_backbone": float((backbone_probs.argmax(1) == labels).mean()),
        "val_acc_cnn": float((cnn_probs.argmax(1) == labels).mean()),
    }
    a, b = scores["val_acc_backbone"], scores["val_acc_cnn"]
    if b > a:
        return {
            "kept_model": "resnet",
            **scores,
            "why": f"kept the from-scratch CNN: {b:.3f} validation accuracy against {a:.3f} for "
            f"{backbone} (train.fallback)",
        }
    return {
        "kept_model": backbone,
        **scores,
        "why": f"kept {backbone}: {a:.3f} validation accuracy, the from-scratch CNN beside it "
        f"{b:.3f}",
    }


def log_outcome(summary: dict, warnings: list[str], members: int) -> None:
    for warning in warnings:
        log.warning("warning: %s", warning)
    if summary.get("kept_model", "resnet") != "resnet":  # keeping the CNN is a warning above
        log.info(
            "train: kept %s: %.3f validation accuracy, the from-scratch CNN beside it %.3f",
            summary["kept_model"],
            summary["val_acc_backbone"],
            summary["val_acc_cnn"],
        )
    log.info(
        "train: ensemble of %d checkpoints, validation accuracy %.3f, temperature %.2f "
        "(validation ECE %.3f -> %.3f)",
        members,
        summary["ensemble_val_acc"],
        summary["temperature"],
        summary["val_ece_before"],
        summary["val_ece_after"],
    )


def run_on_ray(stage_args: dict) -> None:
    """`run(**stage_args)` as cluster.workers Ray Train workers (cluster.engine: ray): the same
    DistributedDataParallel `fit` as under torchrun (pipeline/training/ray_fit.py)."""
    from pipeline.training.ray_fit import train_on_ray

    train_on_ray(run, stage_args)
    report_dir = stage_args["report_dir"]  # the workers' own log lines stay on their nodes
    diagnostics = read_json(report_dir / "diagnostics.json")
    log_outcome(
        diagnostics["summary"], read_json(report_dir / "warnings.json"), len(diagnostics["kept"])
    )


def write_live(live_dir: Path, history: list[dict], summary: dict) -> None:
    """dvclive metrics and per-epoch plots, written as a whole once training has finished."""
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    with atomic_dir(live_dir) as tmp:
        try:
            live = Live(dir=str(tmp), dvcyaml=None, save_dvc_exp=False, report=None)
        except SCMError as exc:  # dvclive reads the git revision even when it saves no experiment
            raise PipelineError(
                f"git: {exc}; commit once before `dvc repro` (git add -A && git commit -m start)"
            ) from None
        for record in history:
            live.log_metric("lr", record["lr"], plot=True)
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "grad_norm"):
                if key in record:
                    live.log_metric(key.replace("_", "/", 1), record[key])
            live.next_step()
        for key, value in summary.items():
            live.summary[key] = value
        live.end()


def write_report(
    report_dir: Path, result: FitResult, config: dict, summary: dict, per_class: pd.DataFrame
) -> None:
    with atomic_dir(report_dir) as tmp:
        write_json(tmp / "config.json", config)
        shares = per_class.assign(
            pseudo_per_human=per_class["pseudo"] / per_class["human"].clip(lower=1)
        )
        write_table(tmp / "per_class.csv", shares.rename_axis("class").reset_index())
        write_json(
            tmp / "diagnostics.json",
            {"history": result.history, "kept": result.kept, "summary": summary},
        )
        write_json(tmp / "warnings.json", result.warnings)
        plot_diagnostics(tmp / "diagnostics.png", result.history)


def plot_diagnostics(path: Path, history: list[dict]) -> None:
    """Loss curves, gradient norm, update ratios, dead units and pre-activation histograms."""
    plt = report.pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, key, title in ((axes[0, 0], "loss", "loss"), (axes[0, 1], "acc", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train")
        if history and f"val_{key}" in history[0]:
            ax.plot(epochs, [h[f"val_{key}"] for h in history], label="validation")
        ax.set(title=title, xlabel="epoch")
        ax.legend()
    ax = axes[0, 2]
    ax.plot(epochs, [h["grad_norm"] for h in history])
    ax.set(title="mean gradient norm", xlabel="epoch")
    ax = axes[1, 0]
    layers = list(history[-1]["update_ratio"]) if history else []
    for name in layers:
        ax.plot(epochs, [h["update_ratio"].get(name, np.nan) for h in history], lw=0.8)
    ax.axhline(1e-3, color="k", ls="--", lw=0.8)
    ax.set(title="update / weight ratio per layer (guide: ~1e-3)", xlabel="epoch", yscale="log")
    ax = axes[1, 1]
    acts = list(history[-1]["activations"]) if history else []
    for name in acts:
        ax.plot(
            epochs, [h["activations"][name]["dead_fraction"] for h in history], label=name, lw=0.8
        )
    ax.set(title="dead units after each activation", xlabel="epoch", ylim=(0, 1))
    ax = axes[1, 2]
    centers = np.linspace(-4, 4, 41)
    centers = (centers[1:] + centers[:-1]) / 2
    for name in acts:
        stats = history[-1]["activations"][name]
        ax.plot(
            centers,
            stats["hist"],
            label=f"{name} (mean {stats['mean']:.2f}, std {stats['std']:.2f})",
            lw=0.8,
        )
    ax.set(title="pre-activation histogram, last epoch", yscale="log")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
