"""What the clean stage does with each training row once its issues are found: pure functions
over the issues table (one row per training image) and the labels and pred_probs.

decide             keep, flag, drop or relabel, with a reason, per clean.policy
guarded_policy     falls back to 'flag' when the K-fold models look too weak to judge the labels
validation_labels  the label each validation row is scored against, and whether it is scored
read_overrides     data/overrides.csv (path,label|keep|drop), checked
apply_overrides    a person's overrides, which win over every decision
truth_scores       precision and recall of the flags against data/truth.csv, where known
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from cleanlab.count import estimate_joint

from pipeline.core.errors import PipelineError
from pipeline.data.scan import confine


def decide(
    issues: pd.DataFrame,
    classes: list[str],
    *,
    policy: str,
    relabel_threshold: float,
) -> pd.DataFrame:
    """A decision (keep, flag, drop, relabel) and a reason for each row."""
    decision = np.full(len(issues), "keep", dtype=object)
    reason = np.full(len(issues), "", dtype=object)
    final = issues["given_label"].to_numpy(dtype=object).copy()
    for i, row in enumerate(issues.itertuples()):
        other_types = [t for t in row.issue_types.split(";") if t and t != "label_issue"]
        if row.label_issue:
            said = f"given {row.given_label!r}, model says {row.suggested_label!r} (p={row.suggested_prob:.2f})"
            if policy == "flag":
                decision[i], reason[i] = "flag", f"label_issue: {said}"
            elif policy.startswith("relabel") and row.suggested_prob >= relabel_threshold:
                decision[i], reason[i] = "relabel", f"relabel_confident: {said}"
                final[i] = row.suggested_label
            elif policy == "relabel_keep":
                decision[i] = "flag"
                reason[i] = (
                    f"kept_not_confident: {said} < clean.relabel_threshold {relabel_threshold}"
                )
            elif policy == "relabel":
                decision[i] = "drop"
                reason[i] = (
                    f"drop_not_confident: {said} < clean.relabel_threshold {relabel_threshold}"
                )
            else:
                decision[i], reason[i] = "drop", f"label_issue: {said}"
        elif other_types:
            decision[i], reason[i] = "flag", ", ".join(other_types)
    out = issues.copy()
    out["decision"], out["reason"], out["label"] = decision, reason, final
    return out


def guarded_policy(
    labels: np.ndarray, pred_probs: np.ndarray, policy: str, max_noise_rate: float
) -> tuple[str, str]:
    """(policy to apply, warning or ""): flag only when the K-fold models are too weak to judge.

    When the estimated share of wrong labels is implausibly high, the usual cause is that the
    K-fold models barely beat chance (too few images, a recipe unfit for the data), not that most
    labels are wrong; dropping or relabeling would then throw away good labels.
    """
    noise = float(1.0 - np.trace(estimate_joint(labels, pred_probs)))
    if noise <= max_noise_rate or policy == "flag":
        return policy, ""
    accuracy = float((pred_probs.argmax(1) == labels).mean())
    chance = float(np.bincount(labels).max() / len(labels))
    return "flag", (
        f"the K-fold models estimate {noise:.0%} of the labels as wrong (above clean.max_noise_rate "
        f"{max_noise_rate}) and agree with only {accuracy:.0%} of the given labels (majority class: "
        f"{chance:.0%}); that usually means the models are too weak to judge the labels, not that "
        f"the labels are that bad. Nothing was dropped or relabeled (clean.policy {policy!r} "
        f"applied as 'flag'); review artifacts/clean/report.html, and check the image size and "
        f"channels ingest used (artifacts/ingest/params.json) and train.model before trusting "
        f"the flags."
    )


def validation_labels(
    decided: pd.DataFrame,
    *,
    relabel_threshold: float,
    trust_model: bool = True,
) -> tuple[pd.Series, pd.Series]:
    """(label scored against, scored?) for validation rows, whatever clean.policy says.

    Overrides win; a flagged label is replaced by a confident suggestion, otherwise the row is
    left out of the score. Without trust_model (the noise guard tripped) flagged rows keep their
    given label and are scored.
    """
    label = decided["given_label"].copy()
    scored = pd.Series(True, index=decided.index)
    for idx, row in decided.iterrows():
        if row["reason"].startswith("override:"):
            label[idx], scored[idx] = row["label"], row["decision"] != "drop"
        elif row["label_issue"] and trust_model:
            confident = row["suggested_prob"] >= relabel_threshold
            label[idx], scored[idx] = row["suggested_label"], confident
    return label, scored


def read_overrides(data_dir: Path, classes: list[str], path: Path | None = None) -> pd.DataFrame:
    """data/overrides.csv (or `path`) as (path, action): action is keep, drop or a class name."""
    path = path or data_dir / "overrides.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["path", "action"])
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not a readable CSV: {exc}") from None
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=["path", "action"])
    if not {"path", "label"} <= set(table.columns):
        raise PipelineError(
            f"{path} needs the columns path,label; it has {','.join(table.columns)}"
        )
    table = table.assign(path=table["path"].str.strip(), action=table["label"].str.strip())
    for line, row in enumerate(table.itertuples(), start=2):
        _, why = confine(data_dir, row.path)
        if why:
            raise PipelineError(f"{path}:{line}: {row.path!r}: {why}")
        if row.action not in ("keep", "drop") and row.action not in classes:
            raise PipelineError(
                f"{path}:{line}: {row.action!r} is not keep, drop or a class ({', '.join(classes)})"
            )
    conflicts = table.groupby("path")["action"].nunique()
    if (conflicts > 1).any():
        first = conflicts[conflicts > 1].index[0]
        actions = sorted(table.loc[table["path"] == first, "action"])
        raise PipelineError(f"{path}: {first!r} is overridden twice, as {' and '.join(actions)}")
    return table[["path", "action"]].drop_duplicates()


def apply_overrides(decided: pd.DataFrame, overrides: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """User overrides win over every decision; returns (table, overrides that matched nothing)."""
    out = decided.copy()
    by_path = dict(zip(overrides["path"], overrides["action"]))
    matched = 0
    for idx, path in out["path"].items():
        action = by_path.get(path)
        if action is None:
            continue
        matched += 1
        if action == "keep":
            out.loc[idx, ["decision", "label"]] = ["keep", out.loc[idx, "given_label"]]
        elif action == "drop":
            out.loc[idx, "decision"] = "drop"
        else:
            out.loc[idx, ["decision", "label"]] = [
                "relabel" if action != out.loc[idx, "given_label"] else "keep",
                action,
            ]
        out.loc[idx, "reason"] = f"override: {action} (data/overrides.csv)"
    return out, len(by_path) - matched


def truth_scores(flagged: np.ndarray, given: pd.Series, truth: pd.Series) -> dict:
    """Precision and recall of flagged label issues against data/truth.csv, where known."""
    known = (truth != "").to_numpy()
    if not known.any():
        return {}
    wrong = (given != truth).to_numpy() & known
    hits = int((flagged & wrong).sum())
    return {
        "truth_rows": int(known.sum()),
        "truly_wrong": int(wrong.sum()),
        "precision": hits / max(int((flagged & known).sum()), 1),
        "recall": hits / max(int(wrong.sum()), 1),
    }
