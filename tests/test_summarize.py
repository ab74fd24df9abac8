"""summarize: the round to use is chosen on validation, never on test."""

import numpy as np
import pandas as pd

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
