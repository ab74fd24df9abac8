"""The command line: one thin command per stage (`python -m pipeline --help`).

Commands return what they computed, so tests can call them directly. User errors
(PipelineError) print one line and exit with status 1; there is no traceback for them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import Params, load_params
from pipeline.errors import PipelineError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Data-centric dataset improvement pipeline: every stage of dvc.yaml is a command here.",
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read")]
DataOpt = Annotated[Path, typer.Option("--data-dir", help="the input folder (see README)")]
OutOpt = Annotated[Path, typer.Option("--out", help="folder the stage writes")]
IngestOpt = Annotated[Path, typer.Option("--ingest", help="the ingest stage's output folder")]


def _params(path: Path) -> Params:
    return load_params(path)


@app.command("demo-data")
def demo_data(
    data_dir: DataOpt = Path("data"),
    params: ParamsOpt = Path("params.yaml"),
    register: Annotated[bool, typer.Option(help="track the written folders with `dvc add`")] = True,
) -> dict:
    """Write scikit-learn's digits into data/ with flipped labels, pools and truth.csv."""
    from pipeline import demo

    return demo.run(data_dir, _params(params), register=register)


@app.command()
def ingest(
    data_dir: DataOpt = Path("data"),
    out: OutOpt = Path("artifacts/ingest"),
    params: ParamsOpt = Path("params.yaml"),
) -> dict:
    """Scan data/, quarantine bad files with a reason, pack images into one array."""
    from pipeline import ingest as stage

    return stage.run(data_dir, out, _params(params))


@app.command()
def clean(
    ingest_dir: IngestOpt = Path("artifacts/ingest"),
    data_dir: DataOpt = Path("data"),
    out: OutOpt = Path("artifacts/clean"),
    params: ParamsOpt = Path("params.yaml"),
) -> dict:
    """K-fold out-of-sample probabilities, cleanlab label issues, decisions and a gallery."""
    from pipeline import clean as stage

    return stage.run(ingest_dir, data_dir, out, _params(params))


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
    from pipeline import augment as stage

    return stage.run(
        table, ingest_dir / "images.npy", ingest_dir / "classes.json", out, _params(params)
    )


@app.command()
def train(
    table: Annotated[Path, typer.Option(help="training table (cleaned)")] = Path(
        "artifacts/clean/train.csv"
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
    """Train the residual CNN; keep the top-k checkpoints as an ensemble; resume after a crash."""
    from pipeline import train as stage

    return stage.run(
        table_path=table,
        images_path=ingest_dir / "images.npy",
        classes_path=ingest_dir / "classes.json",
        augment_dir=augment_dir,
        pseudo_dir=pseudo,
        model_dir=model,
        report_dir=report,
        live_dir=live,
        state_dir=model.parent / f".{model.name}.state",
        params=_params(params),
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("matplotlib", "PIL", "dvclive", "dvc", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app(standalone_mode=False)
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    except typer.Abort:
        typer.echo("aborted", err=True)
        raise SystemExit(130) from None
    except (typer.Exit, SystemExit) as exc:
        raise SystemExit(getattr(exc, "exit_code", getattr(exc, "code", 0))) from None
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        raise
