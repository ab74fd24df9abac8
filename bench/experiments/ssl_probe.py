"""Would a representation learned from the pool itself close the low-label gap? A probe, not a
feature: SimCLR pretraining (Chen et al. 2020) of the round model's own ResNet on every non-test
image, then the round's recipe (`loop.fit`, `train.*` as committed) from those weights against
the same recipe from scratch.

    python bench/experiments/ssl_probe.py pack WORK OUT.npz REGIME SEED
    python bench/experiments/ssl_probe.py run OUT.npz [...] --out RESULT.json [--ssl-steps 2000]

`pack` reads a finished work folder of bench/experiments/rounds.py (ingest, clean and the last
round's pseudo-label set) into one file, so `run` needs none of ingest's or clean's packages and
can run where only torch is (a GPU machine). Per packed seed, `run` trains four models:

- r000: clean's training rows (cleaned labels), from scratch and from the SimCLR weights;
- last: the same rows plus the last round's accepted pseudo-labels, both ways.

Each is scored as the train stage scores a round: its top-k checkpoints averaged, accuracy and
temperature-calibrated loss on the validation rows (what a choice is made on), test accuracy
(reported only). Besides, k-nearest-neighbour labels (k = 10, cosine, from clean's training rows)
in the SimCLR space and in the r000 scratch model's space, scored against truth on the pool
images and on those the last set leaves out.

SimCLR: two views of each image in a batch under the strong policy consistency training uses
(`consistency.unlabeled_policies`), a 2-layer projection head, NT-Xent at temperature 0.2, AdamW
at lr 0.001 with a cosine schedule. The test images never enter pretraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.calibration import apply_temperature, fit_temperature, nll  # noqa: E402
from pipeline.config import AugmentConfig, BaseConfig, TrainConfig, parse, to_dict  # noqa: E402
from pipeline.consistency import unlabeled_policies  # noqa: E402
from pipeline.device import pick_device  # noqa: E402
from pipeline.ensemble import load_checkpoint, predict_proba  # noqa: E402
from pipeline.feed import Samples  # noqa: E402
from pipeline.gpu_augment import BatchAugment  # noqa: E402
from pipeline.loop import fit  # noqa: E402
from pipeline.model import build_model  # noqa: E402

ARMS = ("r000_scratch", "r000_simclr", "last_scratch", "last_simclr")


def pack(work: Path, out: Path, regime: str, seed: int) -> None:
    import pandas as pd
    from outcome import regime_params

    from pipeline.config import with_image_shape
    from pipeline.io import read_array, read_json, read_table

    params = regime_params(regime, seed, {"train.min_steps": 3000})
    classes = read_json(work / "ingest" / "classes.json")
    images = np.asarray(read_array(work / "ingest" / "images"))
    params = with_image_shape(params, images.shape)
    manifest = read_table(work / "ingest" / "manifest.csv")
    train, val = read_table(work / "clean" / "train.csv"), read_table(work / "clean" / "val.csv")
    val = val[val["scored"] == "True"]
    test = manifest[manifest["split"] == "test"]
    last = sorted(p for p in work.glob("r0*") if (p / "pseudo" / "table.csv").is_file())[-1]
    pool = read_table(last / "pseudo" / "table.csv")
    truth = pd.read_csv(work / "data" / "truth.csv", dtype=str)
    truth = dict(zip(truth["path"], truth["true_label"]))
    index = {name: i for i, name in enumerate(classes)}
    rows = lambda t: t["row"].astype(int).to_numpy()  # noqa: E731
    labels = lambda s: s.map(index).to_numpy(np.int64)  # noqa: E731
    accepted = (pool["accepted"] == "True").to_numpy()
    np.savez_compressed(
        out,
        images=images,
        train_rows=rows(train),
        train_labels=labels(train["label"]),
        val_rows=rows(val),
        val_labels=labels(val["label"]),
        test_rows=rows(test),
        test_labels=labels(test["label"]),
        pool_images=np.asarray(read_array(last / "pseudo" / "images"))[rows(pool)],
        pool_truth=labels(pool["path"].map(truth)),
        pool_accepted=accepted,
        pool_labels=np.where(accepted, labels(pool["label"].where(accepted, classes[0])), -1),
        meta=json.dumps(
            {
                "regime": regime,
                "seed": seed,
                "classes": classes,
                "last_round": last.name,
                "base": to_dict(params.base),
                "train": to_dict(params.train),
                "augment": read_json(work / "augment" / "params.json")["augment"],
            }
        ),
    )


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view's positive is the other view of its image, the rest negatives."""
    z = F.normalize(z.float(), dim=1)
    n = len(z) // 2
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, targets)


def pretrain(
    images,
    cfg: TrainConfig,
    aug: AugmentConfig,
    base: BaseConfig,
    n_classes: int,
    device,
    *,
    steps: int,
    batch: int,
    seed: int,
) -> tuple[nn.Module, list[float]]:
    torch.manual_seed(seed)
    model = build_model(cfg.model, base.channels, n_classes).to(
        device, memory_format=torch.channels_last
    )
    d = model.embedding_dim
    head = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d)).to(device)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    _, strong = unlabeled_policies(aug, base)
    x_all = torch.from_numpy(images).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    batch = min(batch, len(x_all))
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    losses, order, at = [], torch.randperm(len(x_all), generator=generator, device=device), 0
    model.train()
    for _ in range(steps):
        if at + batch > len(order):
            order, at = torch.randperm(len(x_all), generator=generator, device=device), 0
        x = x_all[order[at : at + batch]]
        at += batch
        views = torch.cat([strong(x, zeros, generator), strong(x, zeros, generator)])
        views = views.mul_(2).sub_(1).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = nt_xent(head(model.embed(views)), 0.2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
    return model.cpu(), torch.stack(losses).float().cpu().tolist()


def train_round(train: Samples, val: Samples, cfg, aug, base, classes, device, seed, init=None):
    """The train stage's fit and scoring: returns (figures, the top-k models)."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, base.channels, len(classes))
    if init is not None:
        state = {k: v for k, v in init.state_dict().items() if not k.startswith("head.")}
        model.load_state_dict(state, strict=False)
    with tempfile.TemporaryDirectory() as state_dir:
        result = fit(
            model,
            train,
            val,
            cfg,
            seed=seed,
            device=device,
            augmentation=BatchAugment(aug, base, classes),
            state_dir=Path(state_dir),
            fingerprint="probe",
        )
        models = []
        for entry in result.kept:
            member = build_model(cfg.model, base.channels, len(classes))
            member.load_state_dict(load_checkpoint(Path(state_dir) / entry["file"])["state_dict"])
            models.append(member.to(device))
    raw = predict_proba(models, val.images, device)
    temperature = fit_temperature(val.labels, raw)
    figures = {
        "val": float((raw.argmax(1) == val.labels).mean()),
        "val_loss": nll(val.labels, apply_temperature(raw, temperature)),
        "epochs": len(result.history),
    }
    return figures, models


def embed(models, images, device) -> np.ndarray:
    _, features = predict_proba(models, images, device, embeddings=True)
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def knn_labels(reference, labels, queries, n_classes: int, k: int = 10) -> np.ndarray:
    similarity = queries @ reference.T
    nearest = np.argsort(-similarity, axis=1)[:, :k]
    votes = np.zeros((len(queries), n_classes))
    for column in range(k):
        idx = nearest[:, column]
        np.add.at(
            votes, (np.arange(len(queries)), labels[idx]), similarity[np.arange(len(queries)), idx]
        )
    return votes.argmax(1)


def run_one(
    path: Path,
    ssl_steps: int,
    ssl_batch: int,
    min_steps: int | None = None,
    arms_wanted: tuple[str, ...] = ARMS,
) -> dict:
    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    base = parse(BaseConfig, meta["base"], "base")
    cfg = parse(TrainConfig, meta["train"], "train")
    if min_steps is not None:  # a smoke run of the script itself
        cfg = dataclasses.replace(cfg, min_steps=min_steps, epochs=2)
    aug = parse(AugmentConfig, meta["augment"], "augment")
    classes, seed, device = meta["classes"], meta["seed"], pick_device()
    images = data["images"]
    train = Samples(images[data["train_rows"]], data["train_labels"])
    val = Samples(np.ascontiguousarray(images[data["val_rows"]]), data["val_labels"])
    test_images, test_labels = images[data["test_rows"]], data["test_labels"]
    pool, accepted = data["pool_images"], data["pool_accepted"]
    with_pseudo = Samples(
        np.concatenate([train.images, pool[accepted]]),
        np.concatenate([train.labels, data["pool_labels"][accepted]]),
    )
    unlabeled = np.concatenate([train.images, val.images, pool])
    result = {
        "regime": meta["regime"],
        "seed": seed,
        "last_round": meta["last_round"],
        "device": str(device),
        "sizes": {
            "train": len(train),
            "val": len(val),
            "pool": len(pool),
            "left_out": int((~accepted).sum()),
            "pretrain": len(unlabeled),
        },
    }
    started = time.perf_counter()
    encoder, losses = pretrain(
        unlabeled, cfg, aug, base, len(classes), device, steps=ssl_steps, batch=ssl_batch, seed=seed
    )
    result["pretrain"] = {
        "steps": ssl_steps,
        "batch": ssl_batch,
        "seconds": round(time.perf_counter() - started, 1),
        "loss_first_last": [round(losses[0], 3), round(float(np.mean(losses[-50:])), 3)],
    }
    print(f"{meta['regime']} {seed} pretrain: {result['pretrain']}", file=sys.stderr, flush=True)
    truth, left_out = data["pool_truth"], ~accepted
    arms, scratch_models = {}, None
    for name, samples in (("r000", train), ("last", with_pseudo)):
        for init_name, init in (("scratch", None), ("simclr", encoder)):
            if f"{name}_{init_name}" not in arms_wanted:
                continue
            started = time.perf_counter()
            figures, models = train_round(samples, val, cfg, aug, base, classes, device, seed, init)
            test = predict_proba(models, test_images, device).argmax(1)
            figures["test"] = float((test == test_labels).mean())
            figures["seconds"] = round(time.perf_counter() - started, 1)
            arms[f"{name}_{init_name}"] = figures
            print(
                f"{meta['regime']} {seed} {name}_{init_name}: {figures}",
                file=sys.stderr,
                flush=True,
            )
            if (name, init_name) == ("r000", "scratch"):
                scratch_models = models
    result["arms"] = arms
    knn = {}
    for space, models in (("simclr", [encoder.to(device)]), ("r000_scratch", scratch_models)):
        if models is None:
            continue
        reference = embed(models, train.images, device)
        guess = knn_labels(reference, train.labels, embed(models, pool, device), len(classes))
        knn[space] = {
            "pool": float((guess == truth).mean()),
            "left_out": float((guess[left_out] == truth[left_out]).mean())
            if left_out.any()
            else None,
        }
    result["knn10"] = knn
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("regime")
    p.add_argument("seed", type=int)
    r = sub.add_parser("run")
    r.add_argument("packed", type=Path, nargs="+")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--ssl-steps", type=int, default=2000)
    r.add_argument("--ssl-batch", type=int, default=256)
    r.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    r.add_argument("--min-steps", type=int, default=None, help="override train.min_steps (smoke)")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.work, args.out, args.regime, args.seed)
        return
    results = []
    for path in args.packed:
        results.append(
            run_one(path, args.ssl_steps, args.ssl_batch, args.min_steps, tuple(args.arms))
        )
        print(json.dumps(results[-1]), flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
