"""Would an elastic warp teach the round model the pool images the last set leaves out? A
screen on one packed seed (`ssl_probe.py pack`), not a feature: the last round's training set
(clean's rows and the accepted pseudo-labels) trained with the committed recipe, as is and with
a smooth random warp after the augment policy. Per arm: validation accuracy and loss (what a
choice is made on), accuracy on the pool images the set leaves out and on the whole pool,
against truth.csv (a diagnosis: a user has no truth), test accuracy (reported only).

    python bench/experiments/elastic_screen.py PACKED.npz ARM [ARM ...]
    ARM: base | elastic:MAG:P:GRID  (RMS displacement as a share of the side, share of images,
                                     control points per side)
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "bench" / "experiments")]

import numpy as np  # noqa: E402
import ssl_probe  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.config import AugmentConfig, BaseConfig, TrainConfig, parse  # noqa: E402
from pipeline.device import pick_device  # noqa: E402
from pipeline.ensemble import predict_proba  # noqa: E402
from pipeline.feed import Samples  # noqa: E402
from pipeline.gpu_augment import BatchAugment  # noqa: E402


class Elastic(BatchAugment):
    """The policy, then a smooth random warp: a GRID x GRID field of N(0, 1) displacements,
    upsampled bicubically, scaled to MAG of the image side (RMS), on a share P of the images."""

    magnitude, share, grid = 0.05, 0.5, 4

    def __call__(self, images, labels, generator):
        x = super().__call__(images, labels, generator)
        n, _, h, w = x.shape
        field = torch.randn(n, 2, self.grid, self.grid, generator=generator, device=x.device)
        field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)
        field = field * (2 * self.magnitude)  # grid units span 2 per side
        on = torch.rand(n, generator=generator, device=x.device) < self.share
        field = field * on[:, None, None, None]
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, h, device=x.device),
            torch.linspace(-1, 1, w, device=x.device),
            indexing="ij",
        )
        base = torch.stack([xs, ys], -1)[None]
        grid = base + field.permute(0, 2, 3, 1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def main():
    path, arms = sys.argv[1], sys.argv[2:]
    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    base = parse(BaseConfig, meta["base"], "base")
    cfg = parse(TrainConfig, meta["train"], "train")
    aug = parse(AugmentConfig, meta["augment"], "augment")
    classes, seed, device = meta["classes"], meta["seed"], pick_device()
    images = data["images"]
    train = Samples(images[data["train_rows"]], data["train_labels"])
    val = Samples(np.ascontiguousarray(images[data["val_rows"]]), data["val_labels"])
    pool, accepted, truth = data["pool_images"], data["pool_accepted"], data["pool_truth"]
    samples = Samples(
        np.concatenate([train.images, pool[accepted]]),
        np.concatenate([train.labels, data["pool_labels"][accepted]]),
    )
    for arm in arms:
        started = time.perf_counter()
        name, *values = arm.split(":")
        original = ssl_probe.BatchAugment
        if name == "elastic":
            Elastic.magnitude, Elastic.share, Elastic.grid = (
                float(values[0]),
                float(values[1]),
                int(values[2]),
            )
            ssl_probe.BatchAugment = Elastic
        figures, models = ssl_probe.train_round(samples, val, cfg, aug, base, classes, device, seed)
        ssl_probe.BatchAugment = original
        said = predict_proba(models, pool, device).argmax(1)
        test = predict_proba(models, images[data["test_rows"]], device).argmax(1)
        figures.update(
            arm=arm,
            regime=meta["regime"],
            seed=seed,
            left_out=float((said == truth)[~accepted].mean()),
            pool=float((said == truth).mean()),
            test=float((test == data["test_labels"]).mean()),
            seconds=round(time.perf_counter() - started, 1),
        )
        print(json.dumps(figures), flush=True)


main()
