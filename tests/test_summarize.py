"""summarize: the round to use is chosen on validation, never on test."""

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.stages.summarize import best_round


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


def test_the_page_lists_each_rounds_training_set_and_scores(tmp_path):
    from pipeline.core.io import write_json
    from pipeline.reports.summary_page import render
    from pipeline.stages.summarize import collect_rounds

    reports = tmp_path / "reports"
    kept = {"r000": "resnet", "r001": "tf_efficientnet_lite0"}  # train.fallback's choice
    for name, pseudo in (("r000", 0), ("r001", 30)):
        write_json(reports / name / "evaluate" / "metrics.json", {"accuracy": 0.9, "macro_f1": 0.8})
        summary = {"train_size_human": 50, "train_size_pseudo": pseudo, "ensemble_val_acc": 0.9}
        write_json(reports / name / "train" / "diagnostics.json", {"summary": summary})
        config = {"train": {"model": {"backbone": kept[name]}}}  # what the round kept
        write_json(reports / name / "train" / "config.json", config)
    table = collect_rounds(reports)
    assert table["round"].tolist() == ["r000", "r001"]
    assert table["train_pseudo"].tolist() == [0, 30]
    assert table["model"].tolist() == ["resnet", "tf_efficientnet_lite0"]
    (tmp_path / "summary").mkdir()
    Image.new("RGB", (1, 1)).save(tmp_path / "summary" / "rounds.png")  # the page embeds it
    html = render(table, [], reports, tmp_path, tmp_path, tmp_path, tmp_path / "summary")
    assert "<td>30</td>" in html and "0.800" in html
    assert "<td>CNN</td>" in html and "<td>tf_efficientnet_lite0</td>" in html
    assert "href='reports/r001/train/diagnostics.png'" not in html  # missing: not linked


def test_the_advice_names_a_change_of_network_between_rounds(tmp_path):
    """r000 kept the CNN and scores higher on validation than r001, which kept the backbone: the
    advice says the rounds differ in network, not that the pseudo-labels failed."""
    from pipeline.core.io import write_json, write_table
    from pipeline.stages.summarize import run

    reports = tmp_path / "reports"
    for name, model, val in (("r000", "resnet", 0.95), ("r001", "tf_efficientnet_lite0", 0.90)):
        write_json(reports / name / "evaluate" / "metrics.json", {"accuracy": 0.9, "macro_f1": 0.8})
        predictions = pd.DataFrame({"id": ["a"], "path": ["a.png"], "correct": ["True"]})
        write_table(reports / name / "evaluate" / "predictions.csv", predictions)
        write_json(
            reports / name / "train" / "diagnostics.json", {"summary": {"ensemble_val_acc": val}}
        )
        write_json(
            reports / name / "train" / "config.json", {"train": {"model": {"backbone": model}}}
        )
    run(reports, tmp_path / "clean", tmp_path / "ingest", tmp_path / "summary")
    page = (tmp_path / "summary" / "index.html").read_text()
    assert "kept different networks (resnet and tf_efficientnet_lite0" in page
    assert "pseudo-labels added since" not in page
