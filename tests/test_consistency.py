"""Consistency training (FixMatch, VAT) on the pool images the pseudo-label set leaves out."""

import copy
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from pipeline import loop, train
from pipeline.config import load_params
from pipeline.consistency import UnlabeledFeed, cutout, unlabeled_policies
from pipeline.feed import Samples, Shard
from pipeline.io import ShardWriter, read_array, read_json
from pipeline.model import build_model

from .conftest import train_table, val_table, write_params


def digits(size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as uint8 (N, size, size, 1) and their classes."""
    data = load_digits()
    images = np.clip(data.images * 16, 0, 255).astype(np.uint8)
    if size != 8:
        images = np.kron(images, np.ones((size // 8, size // 8), np.uint8))
    return images[..., None], data.target


def test_views_of_unknown_classes_skip_any_excluded_transform_and_strong_goes_further(
    fast_params,
):
    aug = replace(fast_params.augment, exclude={"6": ("rotate",)})
    weak, strong = unlabeled_policies(aug, fast_params.base)
    assert weak.aug.rotate.p == strong.aug.rotate.p == 0  # a 6 turned over is a 9
    assert weak.aug.shear == fast_params.augment.shear
    assert strong.aug.shear.p >= 0.8 and strong.aug.shear.limit == 2 * aug.shear.limit
    assert strong.aug.crop.scale[0] < weak.aug.crop.scale[0]
    assert strong.aug.hflip.p == 0  # never switched on when the policy has it off

    x = torch.zeros(64, 1, 16, 16)
    cutout(x, torch.Generator().manual_seed(0))
    grey = (x == 0.5).flatten(1).sum(1)
    assert (grey >= 1).all() and (grey <= 9**2).all()  # one square, a quarter to half a side
    assert set(x.unique().tolist()) == {0.0, 0.5}


def test_unlabeled_views_are_seeded_sharded_and_in_the_models_input_range(fast_params):
    images, _ = digits()
    cfg = fast_params.train
    device = torch.device("cpu")

    def first(seed, shard=None):
        feed = UnlabeledFeed(
            images[:100], fast_params.augment, fast_params.base, cfg, device, shard or Shard()
        )
        return next(feed.epoch(seed))

    weak, strong = first(0)
    assert weak.shape == strong.shape == (cfg.unlabeled_ratio * cfg.batch_size, 1, 8, 8)
    assert weak.min() >= -1 and weak.max() <= 1
    assert weak.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(first(0)[1], strong) and not torch.equal(first(1)[1], strong)
    # under torchrun every process shuffles alike and takes its own share of each pass
    twenty = images[:20] + np.arange(20, dtype=np.uint8)[:, None, None, None]  # told apart
    one = replace(cfg, batch_size=20, unlabeled_ratio=1)
    seen = []
    for rank in (0, 1):
        feed = UnlabeledFeed(
            twenty, fast_params.augment, fast_params.base, one, device, Shard(rank, 2)
        )
        assert feed.batch_size == 10
        feed.weak = lambda batch, labels, generator: batch.permute(0, 3, 1, 2).float()
        seen.append({int(view[0, 0, 0]) for view in next(feed.epoch(0))[0]})
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 20


def trained_and_views(fast_params, method: str):
    """A model trained for 200 steps on 300 digits, in training mode, and the first (weak,
    strong) views of the other digits as `method` draws them."""
    images, labels = digits()
    cfg = replace(fast_params.train, mixup=0.0, min_steps=200, unlabeled_method=method)
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 10)
    device = torch.device("cpu")
    loop.fit(model, Samples(images[:300], labels[:300]), None, cfg, seed=0, device=device)
    feed = UnlabeledFeed(images[300:], fast_params.augment, fast_params.base, cfg, device, Shard())
    weak, strong = next(feed.epoch(0))
    model.train()
    return model, weak, strong


def test_the_loss_counts_only_confident_targets_and_pulls_the_strong_view_to_them(fast_params):
    model, weak, strong = trained_and_views(fast_params, "fixmatch")
    loss, share = loop.consistency_loss(model, model(strong), weak, 1.01)
    assert loss.item() == 0 and share.item() == 0  # nothing is that confident: nothing counts

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        loss, share = loop.consistency_loss(model, model(strong), weak, 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert 0 < share.item() <= 1
    assert losses[-1] < 0.7 * losses[0]


def test_vat_moves_each_view_by_eps_where_the_prediction_changes_most(fast_params):
    model, weak, strong = trained_and_views(fast_params, "vat")
    assert strong is None  # VAT makes its own second view
    once = copy.deepcopy(model)
    with torch.no_grad():
        once(weak)  # batch norm's averages after one plain pass over the views
    adversarial, target = loop.virtual_adversary(model, weak, 0.05)

    rms = (adversarial - weak).flatten(1).pow(2).mean(1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 2 * 0.05), rtol=1e-4)  # inputs span [-1, 1]
    assert torch.allclose(target.sum(1), torch.ones(len(weak)))
    for name, average in model.state_dict().items():  # the probe's pass left them alone
        if "running" in name:
            assert torch.equal(average, once.state_dict()[name]), name
    assert model.dropout.training  # switched back on

    model.eval()
    with torch.no_grad():
        clean = F.log_softmax(model(weak), 1)
        noise = torch.randn_like(weak)
        noise *= (2 * 0.05 / noise.flatten(1).pow(2).mean(1).sqrt()).view(-1, 1, 1, 1)

        def divergence(x):
            return F.kl_div(F.log_softmax(model(x), 1), clean, log_target=True, reduction="none")

        towards = divergence(adversarial).sum(1)
        random = divergence(weak + noise).sum(1)
    assert towards.mean() > 5 * random.mean()  # the found direction, not just any move
    loss = loop.vat_loss(model(adversarial), target.detach())
    assert loss.item() > 0


def test_the_vat_loss_is_trained_on(fast_params):
    """Same seeds, same views: only the weight of VAT's loss differs, so the weights after
    training differ only if the loss reaches the optimizer."""
    images, labels = digits()
    device = torch.device("cpu")

    def trained(weight: float) -> dict:
        cfg = replace(
            fast_params.train,
            min_steps=20,
            epochs=1,
            unlabeled_method="vat",
            unlabeled_weight=weight,
        )
        torch.manual_seed(0)
        model = build_model(cfg.model, 1, 10)
        feed = UnlabeledFeed(
            images[300:], fast_params.augment, fast_params.base, cfg, device, Shard()
        )
        samples = Samples(images[:300], labels[:300])
        loop.fit(model, samples, None, cfg, seed=0, device=device, unlabeled=feed)
        return model.state_dict()

    once, again, heavier = trained(1.0), trained(1.0), trained(30.0)
    assert all(torch.equal(once[k], again[k]) for k in once)  # deterministic
    assert not all(torch.equal(once[k], heavier[k]) for k in once)


def test_pool_images_outside_the_set_are_the_unlabeled_ones_a_persons_rejects_excluded(
    ingested, project
):
    table = train_table(ingested)
    classes = read_json(ingested / "classes.json")
    pool_images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    pseudo = project / "pseudo"
    writer = ShardWriter(pseudo / "images", (8, 8, 1))
    writer.extend(pool_images)
    writer.close()
    pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(5)],
            "row": range(5),
            "accepted": ["True", "False", "True", "False", "False"],
            "label": [classes[0], "", classes[1], "", ""],
            "human": ["", "", "", "reject", ""],
        }
    ).to_csv(pseudo / "table.csv", index=False)
    train_set, _, counts, unlabeled = train.load_training_samples(
        table, val_table(table), ingested / "images", classes, pseudo, None
    )
    assert counts["pseudo"].sum() == 2
    assert np.array_equal(unlabeled, pool_images[[1, 4]])
    trained = {image.tobytes() for image in train_set.images}
    assert not any(image.tobytes() in trained for image in unlabeled)


def test_the_train_stage_feeds_the_left_out_pool_images_to_the_consistency_loss(ingested, project):
    """A round's train stage: the pool images outside the set are trained on through the
    consistency loss, shown in its diagnostics and dvclive; weight 0 turns it off."""
    from .test_train import _augment, _stage_args

    write_params(project, {"train": {"unlabeled_weight": 1.0, "unlabeled_threshold": 0.5}})
    _augment(project, ingested)
    pool_images = read_array(ingested / "images")[:40]  # stand-ins for a pool's images
    pseudo = project / "pseudo"
    writer = ShardWriter(pseudo / "images", pool_images.shape[1:])
    writer.extend(pool_images)
    writer.close()
    accepted = np.arange(40) < 10
    pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(40)],
            "row": range(40),
            "accepted": np.where(accepted, "True", "False"),
            "label": np.where(accepted, "zero", ""),
            "human": "",
        }
    ).to_csv(pseudo / "table.csv", index=False)
    args = _stage_args(project, ingested, "r001") | {"pseudo_dir": pseudo}
    summary = train.run(**args)
    assert summary["train_size_pseudo"] == 10 and summary["train_size_unlabeled"] == 30
    history = read_json(args["report_dir"] / "diagnostics.json")["history"]
    assert all(0 <= h["unlabeled_confident"] <= 1 and h["unlabeled_loss"] >= 0 for h in history)
    assert history[-1]["unlabeled_confident"] > 0 and history[-1]["unlabeled_loss"] > 0
    assert (args["live_dir"] / "plots" / "metrics" / "unlabeled" / "confident.tsv").is_file()

    params = load_params(project / "params.yaml", {"train.unlabeled_weight": 0})
    off = train.run(
        **_stage_args(project, ingested, "off") | {"pseudo_dir": pseudo, "params": params}
    )
    assert off["train_size_unlabeled"] == 0 and "unlabeled_confident" not in off
    off_history = read_json(project / "artifacts/reports/off/train/diagnostics.json")["history"]
    assert [h["val_loss"] for h in off_history] != [h["val_loss"] for h in history]

    params = load_params(project / "params.yaml", {"train.unlabeled_method": "vat"})
    vat = train.run(
        **_stage_args(project, ingested, "vat") | {"pseudo_dir": pseudo, "params": params}
    )
    assert vat["train_size_unlabeled"] == 30 and vat["unlabeled_confident"] == 1  # all count
    vat_history = read_json(project / "artifacts/reports/vat/train/diagnostics.json")["history"]
    assert all(h["unlabeled_loss"] > 0 for h in vat_history)
    assert [h["val_loss"] for h in vat_history] != [h["val_loss"] for h in history]
