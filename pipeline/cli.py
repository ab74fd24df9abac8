"""The command line: one thin command per stage (`python -m pipeline --help`).

This module holds the commands dvc.yaml runs (and the hidden ones torchrun reruns) and main();
the commands a user runs by hand are in pipeline/cli_tools.py, the app and the options both share
in pipeline/cli_app.py. Commands return what they computed, so tests can call them directly. User
errors (PipelineError) print one line and exit with status 1; there is no traceback for them.
Each command imports its stage module itself, so `--help` and ingest never pay for torch.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli_app import DataOpt, IngestOpt, OutOpt, ParamsOpt, TruthOpt, app
from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError


@app.command()
def ingest(
    data_dir: DataOpt = Path("data"),
    out: OutOpt = Path("artifacts/ingest"),
    truth: TruthOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> dict:
    """Scan data/, quarantine bad files with a reason, pack images into one array."""
    from pipeline.stages import ingest as stage

    return stage.run(data_dir, out, load_params(params), truth)


@app.command()
def audit(
    data_dir: DataOpt = Path("data"),
    out: OutOpt = Path("artifacts/audit"),
) -> dict:
    """Copy the optional truth.csv, overrides.csv and pseudo_overrides.csv of data/ (or their
    headers) for DVC; create data/test/ empty when it is absent."""
    from pipeline.stages import audit as stage

    return stage.run(data_dir, out)


@app.command()
def clean(
    ingest_dir: IngestOpt = Path("artifacts/ingest"),
    data_dir: DataOpt = Path("data"),
    out: OutOpt = Path("artifacts/clean"),
    overrides: Annotated[
        Path | None,
        typer.Option(help="user decisions path,label (default: <data-dir>/overrides.csv)"),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> dict:
    """K-fold out-of-sample probabilities, cleanlab label issues, decisions and a gallery."""
    from pipeline.stages import clean as stage

    return stage.run(ingest_dir, data_dir, out, load_params(params), overrides)


@app.command()
def augment(
    table: Annotated[Path, typer.Option(help="training table (cleaned)")] = Path(
        "artifacts/clean/train.csv"
    ),
    ingest_dir: IngestOpt = Path("artifacts/ingest"),
    out: OutOpt = Path("artifacts/augment"),
    params: ParamsOpt = Path("params.yaml"),
) -> dict:
    """Build the albumentations policy from params, save it, render a preview sheet."""
    from pipeline.stages import augment as stage

    return stage.run(
        table, ingest_dir / "images", ingest_dir / "classes.json", out, load_params(params)
    )


@app.command()
def train(
    table: Annotated[Path, typer.Option(help="training table (cleaned)")] = Path(
        "artifacts/clean/train.csv"
    ),
    val: Annotated[Path, typer.Option(help="validation table (clean stage)")] = Path(
        "artifacts/clean/val.csv"
    ),
    ingest_dir: IngestOpt = Path("artifacts/ingest"),
    augment_dir: Annotated[Path, typer.Option("--augment", help="augment stage output")] = Path(
        "artifacts/augment"
    ),
    pseudo: Annotated[Path | None, typer.Option(help="pseudo-label folder of this round")] = None,
    model: Annotated[Path, typer.Option(help="where the checkpoint ensemble goes")] = Path(
        "artifacts/rounds/r000/model"
    ),
    report: Annotated[Path, typer.Option(help="where diagnostics go")] = Path(
        "artifacts/reports/r000/train"
    ),
    live: Annotated[Path, typer.Option(help="dvclive folder")] = Path("artifacts/rounds/r000/live"),
    params: ParamsOpt = Path("params.yaml"),
) -> dict:
    """Train train.model (the residual CNN or a timm backbone); keep the top-k checkpoints as an ensemble; resume after a crash."""
    from pipeline.core.io import read_json
    from pipeline.core.processes import launch
    from pipeline.stages import train as stage

    loaded = load_params(params)
    stage_args = dict(
        table_path=table,
        val_path=val,
        images_path=ingest_dir / "images",
        classes_path=ingest_dir / "classes.json",
        augment_dir=augment_dir,
        pseudo_dir=pseudo,
        model_dir=model,
        report_dir=report,
        live_dir=live,
        state_dir=model.parent / f".{model.name}.state",
        params=loaded,
    )
    if loaded.cluster.engine == "ray" and not loaded.train.model.frozen:
        stage.run_on_ray(stage_args)
        return read_json(report / "diagnostics.json")["summary"]
    if loaded.train.nproc > 1 and "LOCAL_RANK" not in os.environ:  # not yet under torchrun
        launch(loaded.train.nproc, sys.argv[1:])
        return read_json(report / "diagnostics.json")["summary"]
    return stage.run(**stage_args)


@app.command()
def evaluate(
    round_name: Annotated[str, typer.Option("--round", help="round name, e.g. r000")] = "r000",
    model: Annotated[Path | None, typer.Option(help="ensemble folder")] = None,
    ingest_dir: IngestOpt = Path("artifacts/ingest"),
    out: Annotated[Path | None, typer.Option("--out", help="report folder")] = None,
    train_report: Annotated[
        Path | None, typer.Option("--train-report", help="the round's train report (warnings)")
    ] = None,
    data_dir: DataOpt = Path("data"),
    params: ParamsOpt = Path("params.yaml"),
) -> dict:
    """Test metrics, confusion matrix, calibration, slices and the misclassified-sample report."""
    from pipeline.stages import evaluate as stage

    model = model or Path(f"artifacts/rounds/{round_name}/model")
    out = out or Path(f"artifacts/reports/{round_name}/evaluate")
    train_report = train_report or out.parent / "train"
    return stage.run(
        model, ingest_dir, train_report, out, load_params(params), round_name, data_dir
    )


JobArg = Annotated[Path, typer.Argument(help="job folder the launching process wrote")]


@app.command("kfold-part", hidden=True)
def kfold_part(job: JobArg) -> None:
    """One process's folds of the clean stage's K-fold (clean.nproc > 1), under torchrun."""
    from pipeline.training.kfold import kfold_part as part

    part(job)


@app.command("predict-part", hidden=True)
def predict_part(job: JobArg) -> None:
    """One process's block of images to predict (evaluate.nproc, pseudolabel.nproc > 1)."""
    from pipeline.training.ensemble import predict_part as part

    part(job)


@app.command("show-errors")
def show_errors(
    round_name: Annotated[str | None, typer.Argument(help="round name; default: the last")] = None,
    top: Annotated[int, typer.Option(help="how many rows")] = 20,
    reports: Annotated[Path, typer.Option(help="reports folder")] = Path("artifacts/reports"),
) -> None:
    """Print a round's most confident mistakes and the path of its report."""
    from pipeline.stages.evaluate import show_errors as most_confident

    if round_name is None:
        done = sorted(p.parent.parent.name for p in reports.glob("*/evaluate/predictions.csv"))
        if not done:
            raise PipelineError(f"no evaluated round under {reports}: run `dvc repro` first")
        round_name = done[-1]
    folder = reports / round_name / "evaluate"
    wrong = most_confident(folder / "predictions.csv", top)
    typer.echo(f"round {round_name}: {len(wrong)} most confident mistakes")
    typer.echo(wrong.to_string(index=False) if len(wrong) else "(none)")
    typer.echo(f"report: {folder / 'report.html'}")


@app.command("init-pseudo")
def init_pseudo(
    out: OutOpt = Path("artifacts/rounds/r000/pseudo"),
    ingest_dir: IngestOpt = Path("artifacts/ingest"),
) -> None:
    """Write the empty pseudo-label set: round r000's, where the first pool round starts."""
    from pipeline.stages.pseudolabel import init_pseudo as stage

    stage(out, ingest_dir / "images")


@app.command()
def pseudolabel(
    round_name: Annotated[str, typer.Option("--round", help="the round trained on the result")] = (
        "r001"
    ),
    pool: Annotated[str, typer.Option(help="pool folder name under data/unlabeled/")] = "pool_001",
    previous: Annotated[
        str | None, typer.Option(help="round whose model labels (default: the one before)")
    ] = None,
    pseudo_in: Annotated[
        Path | None, typer.Option(help="the previous round's set (default: its pseudo/ folder)")
    ] = None,
    data_dir: DataOpt = Path("data"),
    ingest_dir: IngestOpt = Path("artifacts/ingest"),
    model: Annotated[
        Path | None, typer.Option(help="the labeling ensemble (default: the previous round's)")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="pseudo-label set written")] = None,
    report: Annotated[Path | None, typer.Option(help="report folder")] = None,
    truth: TruthOpt = None,
    overrides: Annotated[
        Path | None,
        typer.Option(help="path,label|reject decisions (default: <data-dir>/pseudo_overrides.csv)"),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> dict:
    """Re-score every pool so far with the previous round's ensemble; write this round's set."""
    from pipeline.stages import pseudolabel as stage

    if previous is None:
        number = round_name[1:]
        if not (round_name.startswith("r") and number.isdigit() and int(number) > 0):
            raise PipelineError(f"--round {round_name!r}: expected r001, r002, ... or --previous")
        previous = f"r{int(number) - 1:03d}"
    return stage.run(
        round_name=round_name,
        pool=pool,
        data_dir=data_dir,
        model_dir=model or Path(f"artifacts/rounds/{previous}/model"),
        ingest_dir=ingest_dir,
        pseudo_in=pseudo_in or Path(f"artifacts/rounds/{previous}/pseudo"),
        out_dir=out or Path(f"artifacts/rounds/{round_name}/pseudo"),
        report_dir=report or Path(f"artifacts/reports/{round_name}/pseudolabel"),
        params=load_params(params),
        truth_path=truth,
        overrides_path=overrides,
    )


@app.command()
def summarize(
    reports: Annotated[Path, typer.Option(help="per-round reports folder")] = Path(
        "artifacts/reports"
    ),
    clean_dir: Annotated[Path, typer.Option("--clean", help="clean stage output")] = Path(
        "artifacts/clean"
    ),
    ingest_dir: IngestOpt = Path("artifacts/ingest"),
    out: OutOpt = Path("artifacts/summary"),
) -> dict:
    """One table, plot and index page over every round."""
    from pipeline.stages import summarize as stage

    return stage.run(reports, clean_dir, ingest_dir, out)


@app.command()
def dataset(
    artifacts: Annotated[Path, typer.Option(help="the stages' outputs")] = Path("artifacts"),
    out: OutOpt = Path("artifacts/dataset"),
) -> dict:
    """The improved dataset after the last round: labels.csv, every file's final label and its
    source, or why it was set aside."""
    from pipeline.stages import dataset as stage

    return stage.run(artifacts, out)


# The commands a user runs by hand register here, after the stages: `--help` lists them last.
from pipeline import cli_tools  # noqa: E402, F401

# A full disk, a quota, a read-only folder, a file size limit, no permission.
FILE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("matplotlib", "PIL", "dvclive", "dvc", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app(standalone_mode=False)
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    except OSError as exc:
        if exc.errno not in FILE_ERRORS:
            raise
        # A file access that bypassed pipeline.core.io (a library's own files): still one line.
        typer.echo(f"error: {exc.filename or 'a file'}: {exc.strerror}", err=True)
        raise SystemExit(1) from None
    except typer.Abort:
        typer.echo("aborted", err=True)
        raise SystemExit(130) from None
    except (typer.Exit, SystemExit) as exc:
        raise SystemExit(getattr(exc, "exit_code", getattr(exc, "code", 0))) from None
    except Exception as exc:
        # A usage error (unknown option, missing argument): click's own message. typer 0.29
        # raises its vendored copy of click's classes, so they are known by name, not import.
        if any(cls.__name__ == "ClickException" for cls in type(exc).__mro__):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        raise
