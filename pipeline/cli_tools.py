"""The commands a user runs by hand, outside `dvc repro`: demo data, bringing images in,
adding pools and answers, the review page, the LR range test, tuning and ensembling experiments.

They register on the app of pipeline/cli_app.py; pipeline/cli.py imports this module after its
stage commands, so `--help` lists the dvc.yaml stages first and these after them. As there, each
command imports its tool module itself, so `--help` never pays for torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli_app import DataOpt, IngestOpt, LinkOpt, OutOpt, ParamsOpt, app
from pipeline.core.config import load_params


@app.command("demo-data")
def demo_data(
    data_dir: DataOpt = Path("data"),
    params: ParamsOpt = Path("params.yaml"),
    register: Annotated[bool, typer.Option(help="track the written folders with `dvc add`")] = True,
) -> dict:
    """Write scikit-learn's digits into data/ with flipped labels, pools and truth.csv; one
    round per pool in params.yaml."""
    from pipeline.tools import demo

    return demo.run(data_dir, load_params(params), register=register, params_path=params)


@app.command("add-pool")
def add_pool(
    source: Annotated[Path, typer.Argument(help="folder of unlabeled images")],
    name: Annotated[str | None, typer.Option(help="pool name (default: next pool_NNN)")] = None,
    link: LinkOpt = False,
    data_dir: DataOpt = Path("data"),
    params: ParamsOpt = Path("params.yaml"),
) -> dict:
    """Copy a folder into data/unlabeled/<name>/, track it with DVC, append the next round."""
    from pipeline.tools.pools import add_pool as stage

    result = stage(source, name=name, link=link, data_dir=data_dir, params_path=params)
    typer.echo(
        f"added pool {result['pool']} ({result['images']} images) as round {result['round']}"
    )
    if result["stale"]:
        typer.echo("`dvc repro` will run: " + ", ".join(result["stale"]))
    return result


@app.command()
def init(
    source: Annotated[Path, typer.Argument(help="folder of class folders, or a path,label CSV")],
    test: Annotated[
        Path | None, typer.Option(help="folder of class folders of test images")
    ] = None,
    pool: Annotated[
        list[str] | None, typer.Option(help="NAME=DIR, a folder of unlabeled images; repeat")
    ] = None,
    link: LinkOpt = False,
    force: Annotated[
        bool, typer.Option("--force", help="move a dataset already in data/ aside")
    ] = False,
    data_dir: DataOpt = Path("data"),
    params: ParamsOpt = Path("params.yaml"),
    backbone: Annotated[
        str | None,
        typer.Option(
            help="resnet (a small CNN from scratch) or a timm model name; default: "
            "tf_efficientnet_lite0 for photos when its weights are at hand"
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="imagenet (timm's, via the Hugging Face cache), none, or a state dict file"
        ),
    ] = None,
) -> dict:
    """Bring your own images into data/ (copied, tracked with DVC) and write params that fit
    them: image size, channels, HSV shifts, the backbone, one round per pool."""
    from pipeline.tools import init as stage

    summary = stage.run(
        source,
        test=test,
        pools=pool,
        link=link,
        force=force,
        data_dir=data_dir,
        params_path=params,
        backbone=backbone,
        weights=weights,
    )
    typer.echo(stage.describe(summary))
    return summary


@app.command("add-labels")
def add_labels(
    answers: Annotated[Path, typer.Argument(help="path,label CSV, e.g. a filled-in to_label.csv")],
    data_dir: DataOpt = Path("data"),
    params: ParamsOpt = Path("params.yaml"),
) -> dict:
    """Copy answered pool images into data/labeled/<label>/added/<pool>/ and `dvc add` them."""
    from pipeline.tools.answers import add_labels as stage

    max_pixels = load_params(params).ingest.max_image_pixels
    result = stage(
        answers, data_dir=data_dir, ingest_dir=Path("artifacts/ingest"), max_pixels=max_pixels
    )
    typer.echo(f"added {result['added']} labeled images; `dvc repro` reruns from ingest")
    return result


@app.command()
def review(
    port: Annotated[int, typer.Option(help="port on 127.0.0.1 (0: any free one)")] = 8765,
    data_dir: DataOpt = Path("data"),
    artifacts: Annotated[Path, typer.Option(help="the pipeline's outputs")] = Path("artifacts"),
) -> None:
    """A local page to relabel, keep or drop label issues, reject or confirm pseudo-labels and
    flag test labels; each click is written to the file in data/ the pipeline reads."""
    from pipeline.tools.review import serve

    serve(port, data_dir, artifacts)


@app.command("lr-find")
def lr_find(
    table: Annotated[Path, typer.Option(help="training table")] = Path("artifacts/clean/train.csv"),
    ingest_dir: IngestOpt = Path("artifacts/ingest"),
    out: OutOpt = Path("artifacts/lr_find"),
    steps: Annotated[int, typer.Option(min=10, help="steps of the ramp from 1e-7 to 1")] = 100,
    write: Annotated[
        bool, typer.Option("--write", help="store the suggestion as train.lr")
    ] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> float:
    """Learning-rate range test: writes the loss-vs-LR curve and prints a suggested train.lr."""
    from pipeline.tools import lr_find as stage

    suggestion = stage.run(
        table, ingest_dir, out, load_params(params), steps=steps, write=params if write else None
    )
    typer.echo(f"suggested train.lr: {suggestion:.3g}")
    return suggestion


@app.command()
def tune(
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help="KEY=LOW:HIGH (log), KEY=lin:LOW:HIGH or KEY=A,B,C (categorical); repeat",
        ),
    ] = None,
    sampler: Annotated[
        str | None, typer.Option(help="tpe | qmc | random | grid (the jittered log-grid)")
    ] = None,
    trials: Annotated[
        int | None, typer.Option(min=1, help="trials in all (default: grid's points, else 16)")
    ] = None,
    batch: Annotated[
        int | None, typer.Option(min=1, help="trials asked and queued at once (default 4)")
    ] = None,
    jobs: Annotated[int, typer.Option("-j", "--jobs", min=1, help="DVC queue workers")] = 1,
    per_decade: Annotated[int, typer.Option(min=1, help="grid: values per decade")] = 2,
    jitter: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="grid: random shift, share of a cell")
    ] = 0.5,
    epochs: Annotated[int | None, typer.Option(min=1, help="short schedule for every run")] = None,
    study: Annotated[
        str | None, typer.Option(help="study name (default: the last one, else 'tune')")
    ] = None,
    refine: Annotated[
        bool, typer.Option("--refine", help="a narrowed study around the best trial")
    ] = False,
    report: Annotated[
        bool, typer.Option("--report", help="table and Optuna's plots of the study")
    ] = False,
    apply: Annotated[
        str | None, typer.Option("--apply", help="write this experiment's values")
    ] = None,
    metric: Annotated[str, typer.Option(help="validation metric to maximize")] = "ensemble_val_acc",
    seed: Annotated[int, typer.Option(help="seed of the sampler (and the grid's jitter)")] = 0,
    unlock_batch_size: Annotated[bool, typer.Option(help="allow tuning train.batch_size")] = False,
    out: OutOpt = Path("artifacts/tune"),
    params: ParamsOpt = Path("params.yaml"),
) -> dict:
    """Optuna search run as DVC experiments (TPE, QMC, random or the jittered log-grid); a
    killed run resumes; refine, report, apply the best."""
    from pipeline.tools import tune_study

    return tune_study.main(
        param=param,
        sampler=sampler,
        trials=trials,
        batch=batch,
        jobs=jobs,
        per_decade=per_decade,
        jitter=jitter,
        epochs=epochs,
        study=study,
        refine=refine,
        report=report,
        apply=apply,
        metric=metric,
        seed=seed,
        unlock_batch_size=unlock_batch_size,
        out=out,
        params=params,
    )


@app.command()
def ensemble(
    experiments: Annotated[list[str], typer.Argument(help="finished experiment names")],
    ingest_dir: IngestOpt = Path("artifacts/ingest"),
    val: Annotated[Path, typer.Option(help="validation table (clean stage)")] = Path(
        "artifacts/clean/val.csv"
    ),
    out: OutOpt = Path("artifacts/tune/ensemble"),
) -> list[dict]:
    """Average the checkpoint ensembles of several finished experiments; the gain on validation,
    and the combined result's test accuracy."""
    from pipeline.tools import tune_dvc

    folders = tune_dvc.fetch_models(experiments, out)
    table = tune_dvc.ensemble_runs(folders, ingest_dir, val)
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table.to_dict(orient="records")


@app.command()
def predict(
    paths: Annotated[
        list[Path], typer.Argument(help="image files, folders or CSVs with a path column")
    ],
    round_name: Annotated[
        str | None,
        typer.Option("--round", help="the round whose ensemble predicts (default: last)"),
    ] = None,
    model: Annotated[Path | None, typer.Option(help="a model folder instead of a round's")] = None,
    out: Annotated[Path, typer.Option(help="the CSV to write")] = Path("predictions.csv"),
    top_k: Annotated[int, typer.Option(min=1, help="classes listed per image")] = 3,
    params: ParamsOpt = Path("params.yaml"),
) -> dict:
    """Classify new images with a round's checkpoint ensemble (calibrated); a CSV of path,
    predicted, confidence, top_k, and the reason for files that cannot be read."""
    from pipeline.tools import predict as tool

    model_dir = model or tool.round_model(Path("artifacts/rounds"), round_name)
    counts = tool.run(paths, model_dir=model_dir, out=out, params=load_params(params), top_k=top_k)
    typer.echo(
        f"{counts['classified']} of {counts['files']} files classified "
        f"({counts['refused']} refused, see the reason column): {out}"
    )
    return counts


@app.command()
def export(
    dest: Annotated[Path, typer.Argument(help="folder to write (not inside data/)")],
    test: Annotated[
        bool, typer.Option("--test", "--split", help="also the test split, as DEST/test/")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty DEST")] = False,
    data_dir: DataOpt = Path("data"),
) -> dict:
    """The improved dataset: DEST/labels.csv (every file's final label, where it came from, or
    why it was set aside) and DEST/<label>/<file>, hard-linked where possible."""
    from pipeline.tools import export as tool

    counts = tool.run(dest, data_dir=data_dir, include_test=test, force=force)
    typer.echo(f"{sum(counts.values())} images in {len(counts)} classes: {dest} (labels.csv)")
    return counts


@app.command("export-model")
def export_model(
    dest: Annotated[Path, typer.Argument(help="folder for model.onnx and model.json")],
    round_name: Annotated[
        str | None, typer.Option("--round", help="the round whose ensemble (default: last)")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> dict:
    """A round's checkpoint ensemble as one ONNX graph (uint8 images in, calibrated
    probabilities out) with model.json: classes, input size, channels, temperature, commit."""
    from pipeline.tools import export_model as tool
    from pipeline.tools.predict import round_model

    model_dir = round_model(Path("artifacts/rounds"), round_name)
    info = tool.run(model_dir, dest, load_params(params), model_dir.parent.name)
    typer.echo(
        f"{dest / 'model.onnx'}: {len(info['classes'])} classes, {len(info['members'])} members"
    )
    return info


@app.command()
def diff(
    rev_a: Annotated[str, typer.Argument(help="the older git revision, e.g. HEAD~1")],
    rev_b: Annotated[str, typer.Argument(help="the newer one, e.g. HEAD")] = "HEAD",
    out: Annotated[Path, typer.Option(help="the CSV of changes")] = Path("label_changes.csv"),
) -> int:
    """Which labels changed between two commits of the dataset (artifacts/dataset/labels.csv):
    new pseudo-labels, relabels, drops, answers, each with its classes."""
    from pipeline.tools import diff as tool

    changes = tool.run(rev_a, rev_b, out)
    typer.echo(tool.describe(changes))
    typer.echo(f"{len(changes)} changes: {out}")
    return len(changes)
