"""`base.image_size: auto` and `base.channels: auto` (the committed defaults): ingest chooses
them from the images, so photos swapped into data/ without `init` train in colour at a size
their sides suit, and the demo's 8-px digits pack exactly as the explicit 16 px, grayscale."""

import hashlib

import pytest

from pipeline.core.config import load_params, with_image_shape
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_array, read_json
from pipeline.data.image_stats import fitting_shape
from pipeline.stages import ingest

from .conftest import augment_and_train, train_table, write_digits, write_params, write_photos

AUTO = {"base": {"image_size": "auto", "channels": "auto"}}


def packed_digest(ingest_dir):
    images = read_array(ingest_dir / "images")
    return images.shape, hashlib.sha256(images[:].tobytes()).hexdigest()


@pytest.mark.parametrize(
    ("median", "colour_share", "expected"),
    [
        (8, 0.0, (16, 1)),  # the demo's digits: never under 16 px
        (18, 0.05, (20, 1)),  # halves round up, to a multiple of 4
        (22, 0.1, (24, 3)),  # a tenth of the sample in colour makes a colour set
        (28, 0.0, (28, 1)),  # MNIST's 28 px stay 28
        (67, 0.97, (32, 3)),  # photos: never over 32 px on a CPU
        (0, 0.0, (16, 1)),  # nothing readable: ingest then says there is no class to train
    ],
)
def test_the_size_is_the_median_short_side_and_colour_a_tenth_of_the_sample(
    median, colour_share, expected
):
    chosen = fitting_shape({"short_side": {"median": median}, "colour_share": colour_share})
    assert (chosen["image_size"], chosen["channels"]) == expected
    assert f"{median} px" in chosen["why"]["image_size"]


def test_committed_params_leave_size_and_channels_to_ingest():
    params = load_params()
    assert (params.base.image_size, params.base.channels) == ("auto", "auto")


def test_colour_photos_train_in_colour_at_a_size_from_their_sides(tmp_path):
    data = tmp_path / "data"
    write_photos(data / "labeled", 8)  # 4 classes of crops 40-120 px a side
    write_photos(data / "test", 2, seed=1)
    params = load_params(write_params(tmp_path, AUTO))

    ingest.run(data, tmp_path / "ingest", params)

    images = read_array(tmp_path / "ingest" / "images")
    assert images.shape[1:] == (32, 32, 3)
    chosen = read_json(tmp_path / "ingest" / "params.json")
    assert (chosen["base"]["image_size"], chosen["base"]["channels"]) == (32, 3)
    assert {k: v["value"] for k, v in chosen["auto"].items()} == {"image_size": 32, "channels": 3}
    # a later stage takes the shape ingest chose: the model sees three channels
    model = augment_and_train(
        tmp_path, tmp_path / "ingest", train_table(tmp_path / "ingest"), params
    )
    saved = read_json(model / "ensemble.json")
    assert (saved["image_size"], saved["channels"]) == (32, 3)


def test_auto_packs_the_demo_digits_exactly_as_the_old_explicit_16_px_grayscale(tmp_path):
    data = tmp_path / "data"
    write_digits(data, {0: "zero", 1: "one", 2: "two"}, 12, test_per_class=4)
    packed = {}
    for name, base in (("auto", AUTO["base"]), ("explicit", {"image_size": 16, "channels": 1})):
        (tmp_path / name).mkdir()
        params = load_params(write_params(tmp_path / name, {"base": base}))
        ingest.run(data, tmp_path / name / "ingest", params)
        packed[name] = packed_digest(tmp_path / name / "ingest")
    assert packed["auto"][0][1:] == (16, 16, 1)
    assert packed["auto"] == packed["explicit"]
    assert read_json(tmp_path / "explicit" / "ingest" / "params.json")["auto"] == {}


def test_hsv_shifts_on_images_auto_finds_grayscale_is_one_clear_error(tmp_path):
    data = tmp_path / "data"
    write_digits(data, {0: "zero", 1: "one"}, 6)
    params = load_params(write_params(tmp_path, {**AUTO, "augment": {"hsv": {"p": 0.5}}}))
    with pytest.raises(PipelineError, match="HSV shifts need colour images") as err:
        ingest.run(data, tmp_path / "ingest", params)
    assert "augment.hsv.p: 0" in str(err.value)


def test_an_explicit_size_ingest_did_not_pack_is_refused_with_what_to_do(tmp_path):
    params = load_params(write_params(tmp_path, {"base": {"image_size": 8, "channels": 1}}))
    assert with_image_shape(params, (5, 8, 8, 1)).base == params.base
    with pytest.raises(PipelineError, match=r"base.image_size is 8, .* packed the images at 16 px"):
        with_image_shape(params, (5, 16, 16, 1))
    with pytest.raises(PipelineError, match=r"base.channels is 1, .* with 3 channels"):
        with_image_shape(params, (5, 8, 8, 3))
    resolved = with_image_shape(load_params(write_params(tmp_path, AUTO)), (5, 24, 24, 3))
    assert (resolved.base.image_size, resolved.base.channels) == (24, 3)
