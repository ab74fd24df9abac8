import pytest
import yaml

from pipeline.core.errors import PipelineError
from pipeline.tools.pools import add_pool, next_round

from .conftest import ROOT, write_digits


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    data = tmp_path / "data"
    write_digits(data, {0: "zero", 1: "one"}, 3, test_per_class=2)
    (data / "unlabeled" / "pool_001").mkdir(parents=True)
    (data / "unlabeled" / "pool_002").mkdir(parents=True)
    incoming = tmp_path / "incoming" / "deep"
    incoming.mkdir(parents=True)
    for image in sorted((data / "labeled" / "zero").iterdir()):
        (incoming / image.name).write_bytes(image.read_bytes())
    return tmp_path


def test_appends_the_next_round_and_keeps_comments(workspace):
    result = add_pool(
        workspace / "incoming",
        data_dir=workspace / "data",
        params_path=workspace / "params.yaml",
        register=False,
    )
    assert result["pool"] == "pool_003" and result["round"] == "r003" and result["images"] == 3
    text = (workspace / "params.yaml").read_text()
    assert "# One entry per unlabeled pool" in text and "# seeds numpy" in text
    rounds = yaml.safe_load(text)["rounds"]
    assert rounds["r003"] == {"pool": "pool_003", "previous": "r002"}
    assert (workspace / "data" / "unlabeled" / "pool_003" / "deep").is_dir()
    assert (workspace / "incoming" / "deep").is_dir()  # the source is copied, not moved


def test_hard_links_with_link(workspace):
    add_pool(
        workspace / "incoming",
        name="linked",
        link=True,
        data_dir=workspace / "data",
        params_path=workspace / "params.yaml",
        register=False,
    )
    copied = next((workspace / "data" / "unlabeled" / "linked" / "deep").iterdir())
    assert copied.stat().st_nlink == 2


@pytest.mark.parametrize(
    ("source", "name", "message"),
    [
        ("incoming", "pool_001", "already has a round"),
        ("empty", None, "holds no image files"),
        ("data/test/zero", None, "inside data/test/"),
        ("missing", None, "is not a folder"),
        ("incoming", "../escape", "pool name .* is refused"),
    ],
)
def test_refuses_bad_pools(workspace, source, name, message, record):
    (workspace / "empty").mkdir()
    before = (workspace / "params.yaml").read_text()
    with pytest.raises(PipelineError, match=message):
        add_pool(
            workspace / source,
            name=name,
            data_dir=workspace / "data",
            params_path=workspace / "params.yaml",
            register=False,
        )
    assert (workspace / "params.yaml").read_text() == before
    record(
        "input",
        "add-pool: a taken name, an empty folder, a test folder, a missing folder, `../`",
        f"refused, params.yaml unchanged: {message}",
    )


def test_the_first_pool_round_follows_the_human_labels_round():
    assert next_round({}) == ("r001", "r000")
    assert next_round({"r001": {}, "r002": {}}) == ("r003", "r002")
    assert next_round({"r001": {}, "r003": {}}) == ("r004", "r003")  # never reuses a name
