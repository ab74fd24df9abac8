"""The `tune` command's flow: which study (the one named, the last one used, or a new one),
its search space, sampler and budget (a resumed study keeps its own), then ask, queue, run and
tell until the budget is spent; or, instead, a narrowed study around the best trial (--refine),
the study's report (--report) or an experiment's values written into params.yaml (--apply).
The study itself: pipeline/tools/tune.py; the DVC side: tune_dvc.py; the space: tune_space.py.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_json, write_json
from pipeline.core.names import check_name
from pipeline.tools import tune, tune_dvc, tune_report, tune_space


def main(
    *,
    param: list[str] | None,
    sampler: str | None,
    trials: int | None,
    batch: int | None,
    jobs: int,
    per_decade: int,
    jitter: float,
    epochs: int | None,
    study: str | None,
    refine: bool,
    report: bool,
    apply: str | None,
    metric: str,
    seed: int,
    unlock_batch_size: bool,
    out: Path,
    params: Path,
) -> dict:
    """Run, resume, refine, report or apply an Optuna study of DVC experiments, as the
    `tune` command's options say; prints what it did and returns it."""
    # 1) which study: the one named, the last one used, or a new one
    state_path, storage = out / "state.json", out / "study.db"
    points = None  # the grid sampler's points, enqueued when its study starts
    last = read_json(state_path)["study"] if state_path.is_file() else None
    name = study or (last if not param or refine else None) or "tune"
    check_name(name, "--study")
    if sampler is not None and sampler not in tune.SAMPLERS:
        raise PipelineError(f"--sampler {sampler!r}: one of {', '.join(tune.SAMPLERS)}")
    if apply or report or refine or not param:
        current = tune.open_study(storage, name, None)
        attrs = current.user_attrs
    if apply:
        keys = tune_space.Space.from_json(attrs["space"]).setting_keys
        applied = tune_dvc.apply(apply, keys, params, attrs["metric"], attrs["round"])
        typer.echo(f"wrote {', '.join(f'{k}={v}' for k, v in applied.items())} into {params}")
        return applied
    if report:
        table = tune_report.write_report(current, out / "report")
        typer.echo(table.to_string(index=False))
        typer.echo(f"report: {out / 'report'} (tune.csv, history.png, importances.png, slice.png)")
        return {"best": table.iloc[0].to_dict() if len(table) else None}

    # 2) the space, the sampler and the budget (a resumed study keeps its own)
    if refine:
        table = tune_report.trials_table(current)
        table = table[table["state"] == "complete"]
        if table.empty:
            raise PipelineError(f"study {name!r} has no finished trial to refine around")
        space, borders = tune_space.narrow_space(
            tune_space.Space.from_json(attrs["space"]), table, attrs["metric"]
        )
        for key, side in borders.items():
            if side:
                typer.echo(
                    f"best {key} is on the {side} border: the narrowed range extends past it"
                )
        parent, name = name, tune.next_study_name(name, storage)
        settings = {**attrs, "space": space.to_json(), "parent": parent}
        settings.update(sampler=sampler or attrs["sampler"], trials=trials or attrs["trials"])
        if settings["sampler"] == "grid":
            points = tune_space.three_point_mesh(space)
            settings["trials"] = trials or len(points)
        fixed = attrs["fixed"]
    elif param:
        space = tune_space.parse_space(param, params, unlock_batch_size=unlock_batch_size)
        round_name = tune_space.target_round(space, load_params(params))
        fixed = []
        if epochs:  # a short schedule: exactly these epochs, not stretched to train.min_steps
            fixed = [f"train.epochs={epochs}"]
            fixed += [] if "train.min_steps" in space.keys else ["train.min_steps=0"]
        settings = {
            "space": space.to_json(),
            "metric": metric,
            "round": round_name,
            "sampler": sampler or "tpe",
            "fixed": fixed,
            "batch": batch,
        }
        if settings["sampler"] == "grid":
            points = tune_space.build_mesh(list(space.dims), per_decade, jitter, seed)
        settings["trials"] = trials or (len(points) if settings["sampler"] == "grid" else 16)
        if name in tune.study_names(storage):
            existing = tune.open_study(storage, name, None).user_attrs
            if existing["space"] != settings["space"] or existing["fixed"] != fixed:
                raise PipelineError(
                    f"study {name!r} exists with another search space; resume it without --param "
                    f"or start another with --study NAME"
                )
            settings = existing
    else:
        settings = dict(attrs)
    settings["batch"] = batch or settings.get("batch") or 4
    settings["trials"] = trials or settings["trials"]

    # 3) ask, queue, run, tell until the budget is spent
    current = tune.open_study(storage, name, None, create=settings)
    for key in ("trials", "batch"):  # a resume with --trials N extends the study for good
        current.set_user_attr(key, settings[key])
    current.sampler = tune.create_sampler(
        settings["sampler"], seed=seed, trials=settings["trials"], told=len(current.trials)
    )
    if settings["sampler"] == "grid" and not current.trials:
        space = tune_space.Space.from_json(settings["space"])
        if points is None:
            points = tune_space.build_mesh(list(space.dims), per_decade, jitter, seed)
        for point in points:
            current.enqueue_trial(point)
    write_json(state_path, {"study": name})
    runner = tune_dvc.DvcRunner(
        tune_dvc.target_stage(settings["round"]),
        tune_dvc.metrics_file(settings["round"]),
        settings["metric"],
        jobs,
    )
    counts = tune.run_study(
        current, runner, trials=settings["trials"], batch=settings["batch"], fixed=settings["fixed"]
    )
    best = current.best_trial if counts["told"] > counts["failed"] else None
    typer.echo(
        f"study {name!r}: {counts['told']} trials told ({counts['failed']} failed) in "
        f"{storage}; best: "
        + (f"{best.user_attrs['experiment']} {best.value:.4f}" if best else "none")
        + "; see `python -m pipeline tune --report`"
    )
    return {"study": name, **counts, "best": best.user_attrs["experiment"] if best else None}
