"""audit: the optional files copied (or their headers), and data/test/ created when absent."""

from pipeline.stages import audit


def test_optional_files_are_copied_or_stand_in_as_headers_and_test_is_created(tmp_path):
    data = tmp_path / "data"
    (data / "labeled").mkdir(parents=True)
    (data / "pseudo_overrides.csv").write_text("path,label\nunlabeled/p/x.png,reject\n")
    present = audit.run(data, tmp_path / "out")
    assert present == {
        "truth.csv": False,
        "overrides.csv": False,
        "pseudo_overrides.csv": True,
        "test": False,
    }
    assert (tmp_path / "out" / "truth.csv").read_text() == "path,true_label\n"
    assert (tmp_path / "out" / "overrides.csv").read_text() == "path,label\n"
    assert (tmp_path / "out" / "pseudo_overrides.csv").read_text().endswith("x.png,reject\n")
    assert (data / "test").is_dir() and not any((data / "test").iterdir())
    (data / "test" / "a").mkdir()
    (data / "test" / "a" / "1.png").write_bytes(b"x")
    assert audit.run(data, tmp_path / "out")["test"] is True
