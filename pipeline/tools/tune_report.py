"""tune's report of a study (`tune --report`): the trials as a table (tune.csv), parameter
importances, Optuna's plots (history, importances, slice, contour) and the heatmap of two
log-scale parameters. The study: pipeline/tools/tune.py.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.io import atomic_dir, write_table
from pipeline.reports import report
from pipeline.tools.tune import DEFAULT_METRIC, study_space

log = logging.getLogger(__name__)


def trials_table(study) -> pd.DataFrame:
    """One row per trial: number, experiment, state, the metric and every parameter (best
    first; failed and unfinished trials last)."""
    metric = study.user_attrs.get("metric", DEFAULT_METRIC)
    keys = study_space(study).keys
    rows = [
        {
            "trial": t.number,
            "name": t.user_attrs.get("experiment", ""),
            "state": t.state.name.lower(),
            **{k: t.params.get(k) for k in keys},
            metric: t.value,
        }
        for t in study.get_trials(deepcopy=False)
    ]
    table = pd.DataFrame(rows, columns=["trial", "name", "state", *keys, metric])
    return table.sort_values(metric, ascending=False, na_position="last").reset_index(drop=True)


def write_report(study, out_dir: Path) -> pd.DataFrame:
    """tune.csv, importances.json, and Optuna's plots: optimization history, parameter
    importances, slice and contour over the two most important parameters (heatmap.png as
    before when two numeric parameters are tuned). Returns the table."""
    import optuna
    from optuna.trial import TrialState

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    table = trials_table(study)
    metric = table.columns[-1]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    space = study_space(study)
    importances = {}
    if len(complete) >= 2:
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as exc:  # e.g. one distinct value per parameter
            log.warning("parameter importances skipped: %s", exc)
    top = list(importances)[:2] or space.keys[:2]
    plt = report.pyplot()
    vis = optuna.visualization.matplotlib
    plots = {"history.png": lambda: vis.plot_optimization_history(study)}
    if importances:
        plots["importances.png"] = lambda: vis.plot_param_importances(study)
    if complete:
        plots["slice.png"] = lambda: vis.plot_slice(study, params=top)
    if len(top) == 2 and len(complete) >= 2:
        plots["contour.png"] = lambda: vis.plot_contour(study, params=top)
    with atomic_dir(out_dir) as tmp:
        write_table(tmp / "tune.csv", table)
        (tmp / "importances.json").write_text(json.dumps(importances, indent=2) + "\n")
        for file, draw in plots.items():
            axes = np.ravel(draw())
            axes[0].figure.savefig(tmp / file, dpi=90, bbox_inches="tight")
            plt.close(axes[0].figure)
        numeric = [d.key for d in space.dims if d.numeric and d.log][:2]
        done = table[table["state"] == "complete"].dropna(subset=numeric)
        if len(numeric) == 2 and len(done):
            plot_heatmap(tmp / "heatmap.png", done, numeric, metric)
    return table


def plot_heatmap(path: Path, table: pd.DataFrame, keys: list[str], metric: str) -> None:
    plt = report.pyplot()

    x, y = table[keys[0]].astype(float), table[keys[1]].astype(float)
    fig, ax = plt.subplots(figsize=(6, 5))
    points = ax.scatter(x, y, c=table[metric], s=220, cmap="viridis", edgecolors="k")
    best = table.iloc[0]
    ax.scatter(
        [best[keys[0]]], [best[keys[1]]], marker="*", s=500, c="red", label=f"best: {best['name']}"
    )
    on_border = (x == x.min()) | (x == x.max()) | (y == y.min()) | (y == y.max())
    if on_border.iloc[0]:
        ax.annotate(
            "best lies on the border:\nrefine will extend the range",
            (best[keys[0]], best[keys[1]]),
            textcoords="offset points",
            xytext=(10, 10),
            fontsize=8,
        )
    for _, row in table.iterrows():
        ax.annotate(
            f"{row[metric]:.3f}",
            (row[keys[0]], row[keys[1]]),
            fontsize=7,
            ha="center",
            va="center",
            color="white",
        )
    ax.set(
        xscale="log", yscale="log", xlabel=keys[0], ylabel=keys[1], title=f"{metric} (validation)"
    )
    fig.colorbar(points, ax=ax)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
