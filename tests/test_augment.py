import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.data import transforms
from pipeline.stages import augment

from .conftest import train_table, write_params


def _image(size=16, channels=1):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (size, size, channels), dtype=np.uint8)


def test_policy_keeps_shape_and_dtype_and_uses_every_enabled_transform(tmp_path):
    extra = {
        "base": {"channels": 3, "image_size": 16},
        "augment": {
            k: {"p": 1.0}
            for k in (
                "crop",
                "rotate",
                "shear",
                "hsv",
                "brightness_contrast",
                "hflip",
                "vflip",
                "noise",
                "blur",
            )
        },
    }
    params = load_params(write_params(tmp_path, extra))
    policy = transforms.build_transforms(params.augment, params.base)
    names = [t.__class__.__name__ for t in policy.transforms]
    assert names == [
        "RandomResizedCrop",
        "Rotate",
        "Affine",
        "HorizontalFlip",
        "VerticalFlip",
        "HueSaturationValue",
        "RandomBrightnessContrast",
        "GaussNoise",
        "Blur",
    ]
    out = policy(image=_image(16, 3))["image"]
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_saved_policy_reloads_and_reproduces_with_a_seed(tmp_path):
    params = load_params(write_params(tmp_path, {"base": {"image_size": 16}}))
    policies = transforms.build_policies(params.augment, params.base, ["a", "b"])
    transforms.save_transforms(tmp_path / "t", policies, ["a", "b"])
    loaded = transforms.load_transforms(tmp_path / "t", ["a", "b"])
    transforms.reseed(policies, 7)
    transforms.reseed(loaded, 7)
    image = _image()
    for _ in range(5):
        assert np.array_equal(
            transforms.apply_policy(policies, image, 0), transforms.apply_policy(loaded, image, 0)
        )


def test_class_exclusions_leave_that_class_untouched_by_the_transform(tmp_path):
    only_flip = {
        name: {"p": 0.0} for name in ("crop", "rotate", "shear", "brightness_contrast", "noise")
    }
    extra = {"augment": {**only_flip, "hflip": {"p": 1.0}, "exclude": {"six": ["hflip"]}}}
    params = load_params(write_params(tmp_path, extra))
    classes = ["nine", "six"]
    policies = transforms.build_policies(params.augment, params.base, classes)
    image = _image(8)
    assert np.array_equal(transforms.apply_policy(policies, image, classes.index("six")), image)
    assert np.array_equal(
        transforms.apply_policy(policies, image, classes.index("nine")), image[:, ::-1]
    )


def test_exclusion_of_an_unknown_class_is_refused(tmp_path):
    params = load_params(write_params(tmp_path, {"augment": {"exclude": {"seven": ["hflip"]}}}))
    with pytest.raises(PipelineError, match="augment.exclude names class 'seven'"):
        transforms.build_policies(params.augment, params.base, ["one", "two"])


def test_stage_writes_policy_preview_and_offline_copies(ingested, project):
    write_params(project, {"augment": {"offline_copies": 2}})
    params = load_params(project / "params.yaml")
    table = train_table(ingested)
    out = project / "artifacts" / "augment"
    summary = augment.run(table, ingested / "images", ingested / "classes.json", out, params)
    assert (out / "transforms" / "default.json").is_file()
    assert (out / "preview.png").stat().st_size > 1000
    rows = len(pd.read_csv(table))  # the training rows (validation rows are held out)
    assert summary["offline_copies"] == 2 * rows
    offline = np.load(out / "offline" / "images.npy")
    assert offline.shape == (2 * rows, 8, 8, 1)
