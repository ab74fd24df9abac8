"""Work spread over torchrun processes (clean.nproc, evaluate.nproc, pseudolabel.nproc) gives
what one process gives, file for file: the K-fold's out-of-sample probabilities, embeddings and
issues, the test predictions and the pool predictions.

Every process runs one CPU thread (OMP_NUM_THREADS=1): training's float rounding depends on the
thread count, so one process is compared with several at the same threads per process.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_array
from pipeline.core.processes import block
from pipeline.stages import ingest, pseudolabel
from pipeline.training.ensemble import load_ensemble, predict_packed

from .conftest import (
    augment_and_train,
    pipeline_cli,
    train_table,
    tree_hash,
    write_digits,
    write_params,
    write_truth,
)

pytestmark = pytest.mark.slow  # torchrun: several processes per test


def same_outputs(one: Path, two: Path) -> None:
    """Every file byte for byte, but params.json, which records the nproc that differs."""
    first, second = tree_hash(one), tree_hash(two)
    assert first.pop("params.json") != second.pop("params.json")
    assert first == second


def no_job_folders_left(root: Path) -> None:
    assert not [p for p in root.rglob("*") if ".parts." in p.name]


def test_blocks_cover_the_rows_once_in_whole_batches():
    for n, batch, world in [(0, 4, 2), (3, 4, 2), (9, 4, 2), (10_000, 1024, 3), (5, 1, 8)]:
        blocks = [block(n, batch, rank, world) for rank in range(world)]
        assert np.concatenate([np.arange(n)[b] for b in blocks]).tolist() == list(range(n))
        assert all(b.start % batch == 0 for b in blocks if b.start < n)


def test_two_process_kfold_equals_one_process(project):
    data = project / "data"
    write_truth(
        data, write_digits(data, {0: "zero", 1: "one", 2: "two"}, 30, flip=0.1, test_per_class=5)
    )
    ingest.run(data, project / "ingest", load_params(project / "params.yaml"))
    for nproc in (1, 2):
        # no embedding model: embeddings.npy is then the K-fold's own; 3 folds on 2 processes,
        # at each of two budgets
        clean_params = {"nproc": nproc, "embedding_steps": 0, "min_steps": [0, 60]}
        write_params(project, {"clean": clean_params})
        result = pipeline_cli(project, f"clean --ingest ingest --data-dir data --out clean{nproc}")
    assert "the clean stage's K-fold: 2 processes under torchrun" in result.stderr
    same_outputs(project / "clean1", project / "clean2")
    budgets = json.loads((project / "clean2" / "metrics.json").read_text())["kfold_budgets"]
    assert [b["min_steps"] for b in budgets] == [0, 60]
    probs = np.load(project / "clean2" / "pred_probs.npy")
    assert probs.shape == (90, 3) and (probs.sum(1) > 0.99).all()  # every fold's rows filled
    no_job_folders_left(project)


@pytest.fixture(scope="module")
def round0(tmp_path_factory):
    """A trained round r000 over 10 digit classes, and more test and pool images than one
    prediction batch (1024), so that each of 2 processes predicts a share."""
    root = tmp_path_factory.mktemp("spread")
    params = load_params(write_params(root))
    data = root / "data"
    write_digits(data, {d: str(d) for d in range(10)}, 20, test_per_class=110)
    noise = np.random.default_rng(0).integers(0, 256, (1100, 8, 8), dtype=np.uint8)
    (data / "unlabeled" / "noise").mkdir(parents=True)
    for i, image in enumerate(noise):
        Image.fromarray(image).save(data / "unlabeled" / "noise" / f"n{i:04d}.png")
    ingest.run(data, root / "ingest", params)
    augment_and_train(root, root / "ingest", train_table(root / "ingest"), params)
    pseudolabel.init_pseudo(root / "init", root / "ingest" / "images")
    return root


def test_two_process_evaluate_equals_one_process(round0):
    assert len(read_array(round0 / "ingest" / "images")) > 1024 + 200
    for nproc in (1, 2):
        write_params(round0, {"evaluate": {"nproc": nproc}})
        result = pipeline_cli(
            round0,
            f"evaluate --round r000 --model model --ingest ingest --train-report train "
            f"--out evaluate{nproc}",
        )
    assert "prediction: 2 processes under torchrun" in result.stderr
    same_outputs(round0 / "evaluate1", round0 / "evaluate2")
    no_job_folders_left(round0)


def test_two_process_pool_prediction_equals_one_process(round0):
    for nproc in (1, 2):
        write_params(round0, {"pseudolabel": {"nproc": nproc}})
        result = pipeline_cli(
            round0,
            f"pseudolabel --round r001 --pool noise --previous r000 --pseudo-in init "
            f"--model model --ingest ingest --out pseudo{nproc} --report report{nproc}",
        )
    assert "prediction: 2 processes under torchrun" in result.stderr
    assert tree_hash(round0 / "pseudo1") == tree_hash(round0 / "pseudo2")
    assert read_array(round0 / "pseudo2" / "images").shape[0] == 1100
    same_outputs(round0 / "report1", round0 / "report2")
    no_job_folders_left(round0)


def test_blocks_of_a_few_rows_gather_in_order(round0):
    """Small batches, so both processes get several: the members' (M, N, K) and the embeddings
    come back in row order too."""
    ensemble = load_ensemble(round0 / "model")
    rows = np.arange(0, 300, 3)[::-1]  # any rows, in any order
    options = {"members": True, "embeddings": True, "batch_size": 16}
    one = predict_packed(ensemble, round0 / "ingest" / "images", rows, **options)
    two = predict_packed(ensemble, round0 / "ingest" / "images", rows, nproc=2, **options)
    members, dim = len(ensemble.models), ensemble.models[0].embedding_dim
    assert [a.shape for a in two] == [(100, 10), (members, 100, 10), (100, dim)]
    for a, b in zip(one, two):
        assert np.array_equal(a, b)


def test_a_process_error_is_one_line(round0, tmp_path, capfd, record):
    ensemble = load_ensemble(round0 / "model")
    ensemble.folder = tmp_path / "gone"  # the processes load the ensemble from here: missing
    with pytest.raises(PipelineError) as caught:
        predict_packed(ensemble, round0 / "ingest" / "images", nproc=2, batch_size=512)
    assert (
        str(caught.value)
        == f"missing input {tmp_path / 'gone' / 'ensemble.json'}: run the train stage first"
    )
    assert "Traceback" not in capfd.readouterr().err
    record("fault", "an error in one of several torchrun processes", "one line, the process's own")
