"""The search space of `tune`: parsed from `--param`, checked against params, sampled by Optuna.

`--param` forms (KEY is a dotted params key, e.g. train.lr):
  KEY=LOW:HIGH       log scale; an integer range when the key is an integer (train.model.width,
                     train.min_steps; train.model.blocks: the same count in every stage)
  KEY=lin:LOW:HIGH   linear scale (pseudolabel.threshold, train.model.dropout)
  KEY=A,B,C          categorical, each choice a YAML value (adamw,sgd or [1,1],[2,2])
Conditional keys are sampled only where they apply: train.momentum with SGD, train.betas (or
train.beta1 / train.beta2, one coefficient each) with Adam and AdamW. Values go to DVC as
`-S KEY=VALUE` assignments, never into the user's params.yaml.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.core.config import Params, load_params
from pipeline.core.errors import PipelineError

LOCKED = {"train.batch_size"}  # docs/tuning.md: tune it alone, then retune the rest
# Sections whose keys can change round r000's (or a pool round's) validation score.
SECTIONS = {"base", "ingest", "clean", "augment", "train", "pseudolabel"}
# Coefficients of train.betas, tunable one at a time; the other stays as in params.yaml.
BETAS = {"train.beta1": 0, "train.beta2": 1}
# key -> the optimizers it applies to
CONDITIONS = {
    "train.momentum": {"sgd"},
    "train.betas": {"adam", "adamw"},
    "train.beta1": {"adam", "adamw"},
    "train.beta2": {"adam", "adamw"},
}
OPTIMIZER = "train.optimizer"
BLOCKS = "train.model.blocks"


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted params key (or train.beta1 / train.beta2); Optuna's parameter name
    kind: str  # float | int | categorical
    low: float = 0.0
    high: float = 0.0
    log: bool = True
    choices: tuple[str, ...] = ()  # YAML texts, as they go to `-S`

    @property
    def decades(self) -> float:
        return math.log10(self.high) - math.log10(self.low)

    @property
    def numeric(self) -> bool:
        return self.kind != "categorical"


@dataclass(frozen=True)
class Space:
    dims: tuple[Dimension, ...]
    # what assignments need from params.yaml: its optimizer, betas and blocks per stage
    baseline: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dims]

    @property
    def setting_keys(self) -> list[str]:
        """The params keys the assignments set (train.beta1 sets train.betas)."""
        return list(dict.fromkeys("train.betas" if k in BETAS else k for k in self.keys))

    def to_json(self) -> dict:
        return {"dims": [dataclasses.asdict(d) for d in self.dims], "baseline": self.baseline}

    @classmethod
    def from_json(cls, data: dict) -> Space:
        dims = tuple(Dimension(**{**d, "choices": tuple(d["choices"])}) for d in data["dims"])
        return cls(dims, data["baseline"])


# --------------------------------------------------------------------------------------------
# 1) Parsing and checking


def parse_dimension(text: str, *, unlock_batch_size: bool = False) -> Dimension:
    """`train.lr=1e-1:1e-4` -> a log-scale float from 1e-4 to 1e-1 (the order of bounds is free)."""
    key, sep, spec = text.partition("=")
    if not sep or not key or not spec:
        raise PipelineError(f"--param {text!r}: expected KEY=LOW:HIGH, e.g. train.lr=1e-4:1e-1")
    if key in LOCKED and not unlock_batch_size:
        raise PipelineError(
            f"--param {key} is locked (docs/tuning.md); pass --unlock-batch-size to tune it"
        )
    if ":" in spec and not spec.lstrip().startswith("["):
        scale, _, bounds = spec.rpartition(":")
        scale, _, low = scale.rpartition(":") if scale.count(":") else ("", "", scale)
        if scale not in ("", "log", "lin"):
            raise PipelineError(f"--param {text!r}: the scale is log or lin, not {scale!r}")
        try:
            a, b = float(low), float(bounds)
        except ValueError:
            raise PipelineError(
                f"--param {text!r}: expected KEY=LOW:HIGH, e.g. train.lr=1e-4:1e-1"
            ) from None
        log = scale != "lin"
        if a == b or (log and (a <= 0 or b <= 0)):
            raise PipelineError(
                f"--param {text!r}: a log-scale range needs two different positive bounds"
                if log
                else f"--param {text!r}: a range needs two different bounds"
            )
        kind = "int" if _is_int_key(key) else "float"
        return Dimension(key, kind, min(a, b), max(a, b), log)
    choices = tuple(c.strip() for c in _split_top_level(spec))
    for choice in choices:
        _yaml_value(choice, text)
    return Dimension(key, "categorical", choices=tuple(dict.fromkeys(choices)))


def parse_space(texts: list[str], params_path: Path, *, unlock_batch_size: bool = False) -> Space:
    """Every --param parsed and checked against the typed params: unknown keys, values out of
    range and conditional keys that can never apply are refused with the key in the message."""
    dims = [parse_dimension(t, unlock_batch_size=unlock_batch_size) for t in texts]
    keys = [d.key for d in dims]
    if len(set(keys)) < len(keys):
        raise PipelineError(f"--param: a key is given twice: {', '.join(keys)}")
    if "train.betas" in keys and set(BETAS) & set(keys):
        raise PipelineError("--param: tune train.betas or train.beta1/beta2, not both")
    params = load_params(params_path)
    baseline = {
        OPTIMIZER: params.train.optimizer,
        "train.betas": list(params.train.betas),
        BLOCKS: list(params.train.model.blocks),
    }
    space = Space(tuple(sorted(dims, key=lambda d: d.key != OPTIMIZER)), baseline)
    optimizers = set(space_choices(space, OPTIMIZER)) or {params.train.optimizer}
    for dim in dims:
        section = dim.key.split(".")[0]
        if section not in SECTIONS:
            raise PipelineError(
                f"--param {dim.key}: cannot change a validation score; tunable sections: "
                f"{', '.join(sorted(SECTIONS))}"
            )
        if dim.key in CONDITIONS and not optimizers & CONDITIONS[dim.key]:
            raise PipelineError(
                f"--param {dim.key} only applies with train.optimizer "
                f"{' or '.join(sorted(CONDITIONS[dim.key]))} (it is {', '.join(sorted(optimizers))}); "
                f"tune train.optimizer too or change it in {params_path}"
            )
        values = [dim.low, dim.high] if dim.numeric else list(dim.choices)
        for value in values:
            if dim.kind == "int":
                value = int(round(value))
            overrides = {k: _yaml_value(v, k) for k, v in _assign(dim.key, value, space).items()}
            load_params(params_path, overrides)  # raises with the key and the allowed range
    return space


def space_choices(space: Space, key: str) -> tuple[str, ...]:
    return next((d.choices for d in space.dims if d.key == key), ())


def target_round(space: Space, params: Params) -> str:
    """The round whose validation score is tuned: r000, or the last pool round when a
    pseudolabel key is tuned (r000 trains on human labels only, so it would never see them)."""
    if not any(k.startswith("pseudolabel.") for k in space.keys):
        return "r000"
    if not params.rounds:
        raise PipelineError(
            "pseudolabel keys only change pool rounds and params.yaml has none: add a pool first"
        )
    return sorted(params.rounds)[-1]


# --------------------------------------------------------------------------------------------
# 2) Sampling and assignments


def applies(key: str, optimizer: str) -> bool:
    return key not in CONDITIONS or optimizer in CONDITIONS[key]


def suggest(trial, space: Space) -> dict[str, Any]:
    """Ask the trial for a value of every dimension that applies (define-by-run, so Optuna
    learns the conditional structure: momentum only exists in SGD trials)."""
    values = {}
    optimizer = space.baseline.get(OPTIMIZER, "adamw")
    for dim in space.dims:
        if not applies(dim.key, optimizer):
            continue
        if dim.kind == "float":
            value = trial.suggest_float(dim.key, dim.low, dim.high, log=dim.log)
        elif dim.kind == "int":
            value = trial.suggest_int(dim.key, int(dim.low), int(dim.high), log=dim.log)
        else:
            value = trial.suggest_categorical(dim.key, list(dim.choices))
        values[dim.key] = value
        if dim.key == OPTIMIZER:
            optimizer = str(_yaml_value(value, dim.key))
    return values


def assignments(values: dict[str, Any], space: Space) -> list[str]:
    """`-S` assignments for one trial's values: `train.lr=0.00312`, `train.betas=[0.85, 0.999]`."""
    merged: dict[str, str] = {}
    for key, value in values.items():
        merged.update(_assign(key, value, space, merged))
    return [f"{k}={v}" for k, v in merged.items()]


def _assign(key: str, value: Any, space: Space, merged: dict | None = None) -> dict[str, str]:
    if key in BETAS:
        betas = (merged or {}).get("train.betas")
        betas = _yaml_value(betas, key) if betas else list(space.baseline["train.betas"])
        betas[BETAS[key]] = float(f"{value:.6g}")
        return {"train.betas": f"[{betas[0]}, {betas[1]}]"}
    if key == BLOCKS and not isinstance(value, str):
        stages = len(space.baseline[BLOCKS]) or 1
        return {key: "[" + ", ".join([str(int(value))] * stages) + "]"}
    if isinstance(value, float):
        return {key: f"{value:.6g}"}
    return {key: str(value)}


# --------------------------------------------------------------------------------------------
# 3) Meshes: the jittered log-grid sampler and refinement


def build_mesh(
    dims: list[Dimension], per_decade: int, jitter: float, seed: int
) -> list[dict[str, Any]]:
    """Every combination of log-spaced values (every choice of a categorical), each numeric
    point shifted randomly within its cell.

    A log range of D decades gets round(D * per_decade) + 1 values (a linear one per_decade + 1;
    at least 2). With jitter j, each coordinate moves uniformly by up to +-j/2 of a cell (clipped
    to the range), so no two runs probe the same value and the mesh covers the space better
    than a fixed grid. Integers are rounded and repeated points dropped.
    """
    rng = np.random.default_rng(seed)
    axes = []
    for d in dims:
        if not d.numeric:
            axes.append((d, list(d.choices), 0.0))
            continue
        lo, hi = (math.log10(d.low), math.log10(d.high)) if d.log else (d.low, d.high)
        n = max(2, round((d.decades if d.log else 1) * per_decade) + 1)
        axes.append((d, list(np.linspace(lo, hi, n)), (hi - lo) / (n - 1)))
    points, seen = [], set()
    for combo in itertools.product(*(range(len(values)) for _, values, _ in axes)):
        point = {}
        for (d, values, cell), i in zip(axes, combo):
            if not d.numeric:
                point[d.key] = values[i]
                continue
            x = values[i] + rng.uniform(-jitter / 2, jitter / 2) * cell
            lo, hi = (math.log10(d.low), math.log10(d.high)) if d.log else (d.low, d.high)
            x = min(max(x, lo), hi)  # edge points only move inwards: the bounds are bounds
            value = 10**x if d.log else x
            point[d.key] = int(round(value)) if d.kind == "int" else float(f"{value:.4g}")
        optimizer = point.get(OPTIMIZER, "adamw")
        point = {k: v for k, v in point.items() if applies(k, str(optimizer))}
        if (frozen := tuple(sorted(point.items()))) not in seen:
            seen.add(frozen)
            points.append(point)
    return points


def _refine_axis(tried: np.ndarray, best: float, factor: float) -> tuple[float, float, str]:
    """Step and centre of a finer axis around `best` (in the axis' own scale) and the border
    the best lies on: "low", "high" or ""."""
    gaps = np.diff(np.unique(np.round(tried, 6)))
    step = (float(np.median(gaps)) if len(gaps) else 1.0) / factor
    if best <= tried.min() + 1e-9:
        return step, best, "low"
    if best >= tried.max() - 1e-9:
        return step, best, "high"
    return step, best, ""


OFFSETS = {"low": (-2, -1, 0), "high": (0, 1, 2), "": (-1, 0, 1)}


def refine_mesh(
    results: pd.DataFrame, keys: list[str], metric: str, *, factor: float = 3.0
) -> tuple[list[dict[str, float]], dict[str, str]]:
    """A finer 3-point-per-param log mesh around the best experiment.

    The step is the median log gap between the tried values divided by `factor`. Where the best
    value lies on the border of what was tried, the new points extend past that border
    instead of centering on it. Returns (points, {key: "low"/"high"/""} border flags).
    """
    best = results.loc[results[metric].idxmax()]
    points_per_key, borders = [], {}
    for key in keys:
        logs = np.log10(results[key].astype(float).to_numpy())
        step, center, borders[key] = _refine_axis(logs, math.log10(float(best[key])), factor)
        points_per_key.append(
            [float(f"{10 ** (center + o * step):.4g}") for o in OFFSETS[borders[key]]]
        )
    points = [dict(zip(keys, combo)) for combo in itertools.product(*points_per_key)]
    return points, borders


def narrow_space(
    space: Space, results: pd.DataFrame, metric: str, *, factor: float = 3.0
) -> tuple[Space, dict[str, str]]:
    """The space of a refining study: each numeric range shrunk to the refine mesh's hull
    around the best trial (past a border where the best lies on it), each categorical fixed to
    the best trial's choice; conditional keys the best trial did not use are dropped."""
    best = results.loc[results[metric].idxmax()]
    dims, borders = [], {}
    for d in space.dims:
        if d.key not in results or pd.isna(best.get(d.key)):
            continue
        if not d.numeric:
            dims.append(dataclasses.replace(d, choices=(str(best[d.key]),)))
            continue
        tried = results[d.key].dropna().astype(float).to_numpy()
        scale = np.log10 if d.log else (lambda x: x)
        step, center, borders[d.key] = _refine_axis(
            scale(tried), float(scale(float(best[d.key]))), factor
        )
        lo, hi = (center + o * step for o in OFFSETS[borders[d.key]][::2])
        lo, hi = (10**lo, 10**hi) if d.log else (lo, hi)
        lo, hi = _clip_to_config(d.key, lo, hi)
        if d.kind == "int":
            lo, hi = math.floor(lo), math.ceil(hi)
            lo = max(lo, 1) if d.log else lo
        if hi <= lo:
            dims.append(Dimension(d.key, "categorical", choices=(str(best[d.key]),)))
        else:
            dims.append(dataclasses.replace(d, low=float(f"{lo:.4g}"), high=float(f"{hi:.4g}")))
    return Space(tuple(dims), space.baseline), borders


def three_point_mesh(space: Space) -> list[dict[str, Any]]:
    """The grid sampler's refinement: low, middle (geometric on a log scale) and high of every
    narrowed range, crossed with the fixed choices: the 3x3 mesh the grid-only tune queued."""
    axes = []
    for d in space.dims:
        if not d.numeric:
            axes.append([(d.key, c) for c in d.choices])
            continue
        mid = math.sqrt(d.low * d.high) if d.log else (d.low + d.high) / 2
        values = [d.low, mid, d.high]
        values = [int(round(v)) for v in values] if d.kind == "int" else values
        axes.append([(d.key, float(f"{v:.4g}") if d.kind == "float" else v) for v in values])
    points = [dict(combo) for combo in itertools.product(*axes)]
    return list({tuple(sorted(p.items())): p for p in points}.values())


def _clip_to_config(key: str, low: float, high: float) -> tuple[float, float]:
    """Keep an extended range inside what the typed params accept (train.dropout <= 0.9 ...)."""
    found = _field(key)
    if found is None:
        return low, high
    lo, hi, open_lo = found.metadata.get("range", (None, None, False))
    eps = 1e-9 if open_lo else 0.0
    low = max(low, lo + eps) if lo is not None else low
    high = min(high, hi) if hi is not None else high
    return low, high


# --------------------------------------------------------------------------------------------
# Helpers


def _field(key: str) -> dataclasses.Field | None:
    """The typed config's field for a dotted key, or None (train.beta1 or an unknown key)."""
    cls, found = Params, None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return None
        found = fields[part]
        cls = typing.get_type_hints(cls)[part]
    return found


def _is_int_key(key: str) -> bool:
    cls = Params
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return cls is int or typing.get_args(cls)[:1] == (int,)  # int or tuple[int, ...]


def _split_top_level(text: str) -> list[str]:
    """`[1,1],[2,2]` -> ['[1,1]', '[2,2]']: commas inside brackets stay."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def _yaml_value(text: Any, where: str) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError:
        raise PipelineError(f"--param {where}: {text!r} is not a YAML value") from None
