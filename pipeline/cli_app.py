"""The Typer app every command registers on, and the options several commands share.

pipeline/cli.py holds the stage commands dvc.yaml runs and main(); pipeline/cli_tools.py the
commands a user runs by hand. Both import the app from here, so neither imports the other's
commands to add its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Data-centric dataset improvement pipeline: every stage of dvc.yaml is a command here.",
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read")]
DataOpt = Annotated[
    Path, typer.Option("--data-dir", help="the input folder (docs/input-contract.md)")
]
OutOpt = Annotated[Path, typer.Option("--out", help="folder the stage writes")]
IngestOpt = Annotated[Path, typer.Option("--ingest", help="the ingest stage's output folder")]
LinkOpt = Annotated[bool, typer.Option("--link", help="hard-link files instead of copying")]
TruthOpt = Annotated[
    Path | None,
    typer.Option("--truth", help="audit file path,true_label (default: <data-dir>/truth.csv)"),
]
