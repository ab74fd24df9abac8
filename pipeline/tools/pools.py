"""add-pool: register a folder of unlabeled images as the next semi-supervised round.

Copies (or hard-links) the folder into data/unlabeled/<name>/, tracks it with DVC, and appends
`rounds.rNNN: {pool, previous}` to params.yaml with its comments kept: round rNNN's model trains
on the human labels plus the pseudo-labels that the previous round's model gives every pool so
far. Round r000 (human labels only) is not listed; it always runs. `dvc repro` then runs only
the new round's stages and `summarize`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.io import dvc_add, edit_yaml, stale_stages
from pipeline.core.names import check_name, printable
from pipeline.core.typed import read_yaml
from pipeline.data.images import IMAGE_EXTENSIONS
from pipeline.data.intake import all_or_nothing, copy_file, image_files, refuse_overlap, staging

log = logging.getLogger(__name__)


def next_round(rounds: dict) -> tuple[str, str]:
    """(name, previous) of the round after `rounds` (ordered by name; r000 is implicit)."""
    last = sorted(rounds)[-1] if rounds else "r000"
    numbers = [int(name[1:]) for name in rounds if name[1:].isdigit()]
    return f"r{max(numbers, default=0) + 1:03d}", last


def add_pool(
    source: Path,
    *,
    name: str | None = None,
    link: bool = False,
    data_dir: Path = Path("data"),
    params_path: Path = Path("params.yaml"),
    register: bool = True,
) -> dict:
    """Copy the image files of `source` into data/unlabeled/<name>/ and append its round; all
    or nothing: an error or Ctrl-C at any point leaves data/ and params.yaml as they were."""
    source, data_dir = Path(source), Path(data_dir)
    if not source.is_dir():
        raise PipelineError(f"{printable(str(source))} is not a folder")
    if not params_path.is_file():
        raise PipelineError(f"params file not found: {params_path}")
    unlabeled = data_dir / "unlabeled"
    resolved = source.resolve()
    for forbidden in ("test", "labeled"):
        root = (data_dir / forbidden).resolve()
        if resolved == root or root in resolved.parents:
            raise PipelineError(
                f"{source} is inside data/{forbidden}/: those images are never pseudo-labeled"
            )
    in_place = resolved.parent == unlabeled.resolve()
    if not in_place:
        refuse_overlap(source, data_dir)
    skipped: list[str] = []
    images = image_files(source, skipped)
    if not images:
        raise PipelineError(
            f"{printable(str(source))} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    links = [line for line in skipped if "symbolic link" in line]
    if in_place and links:  # `dvc add` would follow them into the cache and the remote
        raise PipelineError(
            f"{source} holds links ({links[0]}"
            + (f" and {len(links) - 1} more" if len(links) > 1 else "")
            + "): remove them, or add the folder from outside data/ to copy its images only"
        )

    rounds = (read_yaml(params_path) or {}).get("rounds") or {}
    pools_in_use = {str(r.get("pool")) for r in rounds.values()}
    fix = "choose one with --name NAME"
    if in_place:
        fix = f"rename the folder (e.g. mv {source} {unlabeled / 'pool_new'})"
    name = name or (source.name if in_place else _free_name(unlabeled, pools_in_use))
    check_name(name, "pool name", fix)
    if name in pools_in_use:
        raise PipelineError(f"pool {name!r} already has a round; choose another --name")
    target = unlabeled / name
    if in_place and name != source.name:
        raise PipelineError(
            f"{source} is already in data/unlabeled/ under another name; use --name {source.name}"
        )
    if not in_place and target.exists():
        raise PipelineError(f"{target} already exists; choose another --name")
    round_name, previous = next_round(rounds)

    def append_round(doc) -> None:
        if doc.get("rounds") is None:
            doc["rounds"] = {}
        doc["rounds"][round_name] = {"pool": name, "previous": previous}

    touched = [params_path, unlabeled / ".gitignore", unlabeled / f"{name}.dvc"]
    with all_or_nothing(touched) as changes:
        if not in_place:
            with staging(data_dir, "add-pool") as stage:
                for path, inner in images:
                    copy_file(path, stage / "pool" / inner, link=link)
                unlabeled.mkdir(parents=True, exist_ok=True)
                changes.move(stage / "pool", target)
        edit_yaml(params_path, append_round)
        if register:
            dvc_add(data_dir, [f"unlabeled/{name}"])
    for line in skipped:
        log.warning("add-pool: skipped %s", line)
    log.info(
        "add-pool: %d images in %s; round %s trains on the pseudo-labels of %s's model",
        len(images),
        target,
        round_name,
        previous,
    )
    return {
        "pool": name,
        "round": round_name,
        "images": len(images),
        "skipped": skipped,
        "stale": stale_stages(),
    }


def _free_name(unlabeled: Path, in_use: set[str]) -> str:
    n = 1
    while (unlabeled / f"pool_{n:03d}").exists() or f"pool_{n:03d}" in in_use:
        n += 1
    return f"pool_{n:03d}"


def write_rounds(params_path: Path, pools: list[str]) -> None:
    """Set params.yaml's `rounds` to one round per pool, in order (comments kept)."""
    rounds: dict[str, dict] = {}
    for pool in pools:
        name, previous = next_round(rounds)
        rounds[name] = {"pool": pool, "previous": previous}

    def replace(doc) -> None:
        current = {k: dict(v) for k, v in (doc.get("rounds") or {}).items()}
        if current != rounds:
            doc["rounds"] = rounds

    edit_yaml(params_path, replace)
