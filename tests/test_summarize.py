"""summarize: the round to use is chosen on validation, never on test."""

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.summarize import best_round


def test_the_best_round_is_chosen_on_validation_the_later_on_ties():
    table = pd.DataFrame(
        {
            "round": ["r000", "r001", "r002"],
            "val_accuracy": [0.90, 0.93, 0.91],
            "test_accuracy": [0.99, 0.80, 0.99],  # never looked at
        }
    )
    assert best_round(table)["round"] == "r001"
    table.loc[2, "val_accuracy"] = 0.93
    assert best_round(table)["round"] == "r002"
    table["val_accuracy"] = np.nan
    assert best_round(table)["round"] == "r002"


def test_the_page_counts_and_links_each_rounds_crosschecked_human_rows(tmp_path):
    from pipeline.io import write_json, write_table
    from pipeline.summarize import collect_rounds, render

    reports = tmp_path / "reports"
    for name, relabeled in (("r000", None), ("r001", 2)):
        write_json(reports / name / "evaluate" / "metrics.json", {"accuracy": 0.9, "macro_f1": 0.9})
        summary = {"train_size_human": 50, "train_size_pseudo": 0, "ensemble_val_acc": 0.9}
        if relabeled is not None:  # a train report from before the crosscheck has no count
            summary["crosscheck_relabeled"] = relabeled
            write_table(
                reports / name / "train" / "crosschecked.csv",
                pd.DataFrame({"id": ["a", "b"], "label": ["x", "y"]}),
            )
        write_json(reports / name / "train" / "diagnostics.json", {"summary": summary})
    table = collect_rounds(reports)
    assert table["human_relabeled"].isna().tolist() == [True, False]
    assert table.loc[1, "human_relabeled"] == 2
    (tmp_path / "summary").mkdir()
    Image.new("RGB", (1, 1)).save(tmp_path / "summary" / "rounds.png")  # the page embeds it
    html = render(table, [], reports, tmp_path, tmp_path, tmp_path, tmp_path / "summary")
    assert "human rows relabeled by a model of the pseudo-labels alone" in html
    assert "href='reports/r001/train/crosschecked.csv'>2</a>" in html
    # with the crosscheck off in every round the page has no such column
    off = table.assign(human_relabeled=np.nan)
    html = render(off, [], reports, tmp_path, tmp_path, tmp_path, tmp_path / "summary")
    assert "pseudo-labels alone" not in html and "crosschecked.csv" not in html
