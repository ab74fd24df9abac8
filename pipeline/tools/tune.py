"""tune: an Optuna study whose trials are DVC experiments.

Optuna asks (TPE, QMC, random, or the jittered log-grid), `dvc exp run --queue -S key=value`
queues one experiment per trial, `dvc queue start` runs them, and each experiment's
validation score (from `dvc exp show --json`, never the test split) is told back; failed
experiments are told as failed. The study lives in SQLite (`artifacts/tune/study.db`), and each
trial records its experiment's name before the experiment is queued, so a killed `tune`
resumes where it stopped: trials left running are matched to their experiments by name and
told, or queued again when their experiment never reached the queue. No trial counts twice.

Experiments target the `train` stage (round r000, human labels only) or, when a pseudolabel
key is tuned, the last pool round's. The user's params.yaml is left unchanged; `--apply NAME`
writes a chosen experiment's values into it.

This module: the study (samplers, SQLite storage, ask/queue/run/tell with resume). The rest in
pipeline/tools/: tune_space.py (the search space), tune_dvc.py (trials as DVC experiments,
--apply, the `ensemble` command), tune_report.py (--report), tune_study.py (the command's flow).
"""

from __future__ import annotations

import logging
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipeline.core.errors import PipelineError
from pipeline.tools.tune_space import (  # noqa: F401  (parse_range, build_mesh: the public names)
    LOCKED,
    Dimension,
    Space,
    assignments,
    build_mesh,
    narrow_space,
    parse_dimension,
    refine_mesh,
    suggest,
)

log = logging.getLogger(__name__)

DEFAULT_METRIC = "ensemble_val_acc"
SAMPLERS = ("tpe", "qmc", "random", "grid")
parse_range = parse_dimension  # the name the grid-only tune had


@dataclass(frozen=True)
class Outcome:
    state: str  # queued | running | success | failed
    value: float | None = None  # the metric, for a success that logged it


# --------------------------------------------------------------------------------------------
# 1) The study


def create_sampler(name: str, *, seed: int, trials: int, told: int):
    """Optuna's sampler by name. `told` trials already in the study shift the seed of the
    samplers that draw at random, so a resumed study does not repeat its first draws; QMC keeps
    its seed, since it continues its sequence from the trial count."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if name == "tpe":
        # Few startup trials for small budgets: 10 random ones would be a whole 16-trial study.
        startup = min(10, max(2, trials // 4))
        return optuna.samplers.TPESampler(
            seed=seed + told, n_startup_trials=startup, multivariate=True, group=True
        )
    if name == "qmc":
        return optuna.samplers.QMCSampler(
            seed=seed,
            scramble=True,
            warn_independent_sampling=False,
            warn_asynchronous_seeding=False,
        )
    if name in ("random", "grid"):  # grid: every mesh point is enqueued; random fills no gap
        return optuna.samplers.RandomSampler(seed=seed + told)
    raise PipelineError(f"--sampler {name!r}: one of {', '.join(SAMPLERS)}")


def open_study(storage: Path, name: str, sampler, *, create: dict | None = None):
    """Load study `name` from the SQLite file, or create it when `create` (its attributes:
    space, sampler, target round, metric) is given."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage.parent.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{storage.resolve()}"
    known = study_names(storage)
    if name not in known and create is None:
        raise PipelineError(
            f"no study {name!r} in {storage}: start one with --param KEY=LOW:HIGH"
            + (f" (studies there: {', '.join(sorted(known))})" if known else "")
        )
    study = optuna.create_study(
        storage=url, study_name=name, sampler=sampler, direction="maximize", load_if_exists=True
    )
    if name not in known:
        for key, value in {**create, "tag": secrets.token_hex(2)}.items():
            study.set_user_attr(key, value)
    return study


def study_names(storage: Path) -> set[str]:
    import optuna

    if not storage.exists():
        return set()
    return {s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{storage.resolve()}")}


def next_study_name(name: str, storage: Path) -> str:
    """tune -> tune-refine1 -> tune-refine2 ...: the refining studies of one search."""
    base, known = name.split("-refine")[0], study_names(storage)
    return next(f"{base}-refine{k}" for k in range(1, 10_000) if f"{base}-refine{k}" not in known)


def study_space(study) -> Space:
    return Space.from_json(study.user_attrs["space"])


class Runner(Protocol):
    """Where trials run: DVC's queue here, in-process training in bench/tune_compare.py."""

    def queue(self, name: str, sets: list[str]) -> None: ...

    def wait(self, names: list[str]) -> dict[str, Outcome]: ...


def run_study(study, runner: Runner, *, trials: int, batch: int, fixed: list[str]) -> dict:
    """Ask, queue, run and tell in batches of `batch` until `trials` trials are told.

    `fixed` assignments go to every experiment (e.g. a short schedule). Returns counts.
    """
    import optuna
    from optuna.trial import TrialState

    space = study_space(study)
    done = (TrialState.COMPLETE, TrialState.FAIL)
    # 1) trials a killed tune left running: told from their experiment, or queued again
    left = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if left:
        log.info("resuming: %d trial(s) left running by an earlier tune", len(left))
        # Optuna returns a parameter already suggested to a trial, so a rebuilt trial keeps
        # the values it was given and draws only the ones a kill kept it from drawing.
        rebuilt = [optuna.trial.Trial(study, t._trial_id) for t in left]
        _run_batch(study, runner, rebuilt, space, fixed, resume=True)
    # 2) new batches
    batches = 0
    while (told := len(study.get_trials(deepcopy=False, states=done))) < trials:
        asked = [study.ask() for _ in range(min(batch, trials - told))]
        _run_batch(study, runner, asked, space, fixed, resume=False)
        batches += 1
    finished = study.get_trials(deepcopy=False, states=done)
    return {
        "told": len(finished),
        "failed": sum(t.state == TrialState.FAIL for t in finished),
        "batches": batches,
    }


def experiment_name(study, number: int) -> str:
    """Unique across studies of the same name (the tag is drawn when the study is created)."""
    return f"{study.study_name}-{study.user_attrs['tag']}-{number:03d}"


def _run_batch(study, runner: Runner, trials: list, space: Space, fixed, *, resume) -> None:
    from optuna.trial import TrialState

    names = {t.number: experiment_name(study, t.number) for t in trials}
    known = runner.wait(list(names.values())) if resume else {}
    for trial in trials:
        name = names[trial.number]
        if name in known:  # queued (or finished) before the kill: never queued twice
            continue
        # The name is stored before the experiment is queued: a kill in between leaves a
        # trial whose experiment DVC does not know, and the resume queues it then.
        trial.set_user_attr("experiment", name)
        sets = assignments(suggest(trial, space), space) + fixed
        trial.set_user_attr("sets", sets)
        runner.queue(name, sets)
        log.info("trial %d: %s (%s)", trial.number, name, ", ".join(sets))
    outcomes = runner.wait(list(names.values()))
    for number, name in names.items():
        outcome = outcomes.get(name, Outcome("failed"))
        if outcome.state == "success" and outcome.value is not None:
            study.tell(number, float(outcome.value), skip_if_finished=True)
        else:
            log.warning("trial %d (%s) failed; see `dvc queue logs %s`", number, name, name)
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
