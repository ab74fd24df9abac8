"""The `gpu` augmentation backend against albumentations, on CPU: the same transforms, pixel
by pixel for fixed parameters, and the same distribution of random parameters for a policy."""

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from sklearn.datasets import load_digits

from pipeline.core.config import AugmentConfig, BaseConfig, transform_names
from pipeline.core.typed import parse
from pipeline.data.transforms import apply_policy, build_policies, reseed
from pipeline.training.gpu_augment import BatchAugment, BatchParams

SIZE = 32
BORDER = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0}


def digit_rgb() -> np.ndarray:
    """A real digit, upscaled, with three different channels (so hue and flips show)."""
    image = (load_digits().images[3] * 16).astype(np.uint8)
    image = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    return np.stack([image, np.roll(image, 3, axis=1), 255 - image], axis=-1)


def fixed(on: str = "", **values) -> BatchParams:
    """Parameters for one image: only transform `on`, with the given values."""
    defaults = {
        "crop": [0.0, 0.0, 1.0, 1.0],
        "angle": 0.0,
        "shear": [0.0, 0.0],
        "hsv": [0.0, 0.0, 0.0],
        "alpha": 1.0,
        "beta": 0.0,
        "noise_std": 0.0,
        "blur": 3.0,
    }
    defaults.update(values)
    return BatchParams(
        on={name: torch.tensor([name == on]) for name in transform_names()},
        **{key: torch.tensor([value], dtype=torch.float32) for key, value in defaults.items()},
    )


def ours(image: np.ndarray, params: BatchParams) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    augment = BatchAugment(AugmentConfig(), BaseConfig(image_size=SIZE, channels=3), ["a"])
    return augment.apply(x, params, torch.Generator())[0].permute(1, 2, 0).numpy() * 255


CROP_BOX = A.Compose(
    [A.Crop(x_min=4, y_min=2, x_max=28, y_max=26), A.Resize(SIZE, SIZE, cv2.INTER_LINEAR)]
)


@pytest.mark.parametrize(
    ("name", "albumentation", "params"),
    [
        ("rotate +20", A.Rotate(limit=(20, 20), p=1, **BORDER), fixed("rotate", angle=20.0)),
        ("rotate -35", A.Rotate(limit=(-35, -35), p=1, **BORDER), fixed("rotate", angle=-35.0)),
        (
            "shear x 10, y -8",
            A.Affine(shear={"x": (10, 10), "y": (-8, -8)}, p=1, **BORDER),
            fixed("shear", shear=[10.0, -8.0]),
        ),
        ("hflip", A.HorizontalFlip(p=1), fixed("hflip")),
        ("vflip", A.VerticalFlip(p=1), fixed("vflip")),
        ("crop 24x24 at (4, 2)", CROP_BOX, fixed("crop", crop=[0.0, -0.125, 0.75, 0.75])),
        (
            "hsv",
            A.HueSaturationValue(
                hue_shift_limit=(10, 10), sat_shift_limit=(20, 20), val_shift_limit=(-15, -15), p=1
            ),
            fixed("hsv", hsv=[10.0, 20 / 255, -15 / 255]),
        ),
        (
            "brightness and contrast",
            A.RandomBrightnessContrast(brightness_limit=(0.1, 0.1), contrast_limit=(0.2, 0.2), p=1),
            fixed("brightness_contrast", alpha=1.2, beta=0.1),
        ),
        ("blur 5", A.Blur(blur_limit=(5, 5), p=1), fixed("blur", blur=5.0)),
    ],
)
def test_each_transform_matches_albumentations_pixel_by_pixel(name, albumentation, params):
    image = digit_rgb()
    expected = albumentation(image=image)["image"].astype(np.float64)
    got = ours(image, params)
    assert np.abs(expected - got).mean() < 1.0, name  # of 255: interpolation rounding only


def ramps(n: int) -> np.ndarray:
    """Images whose red channel rises left to right and green top to bottom."""
    ramp = np.linspace(0, 255, SIZE)
    image = np.stack(
        [
            np.tile(ramp, (SIZE, 1)),
            np.tile(ramp[:, None], (1, SIZE)),
            0 * ramp[:, None] + np.zeros(SIZE),
        ],
        axis=-1,
    )
    return np.repeat(image.astype(np.uint8)[None], n, axis=0)


def gradients(images: np.ndarray) -> np.ndarray:
    """(N, 2, 2): least-squares slope (per pixel, x and y) of red and green over the centre."""
    half = SIZE // 4
    centre = images[:, half:-half, half:-half, :2].astype(np.float64)
    ys, xs = np.mgrid[: centre.shape[1], : centre.shape[2]]
    design = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], axis=1)
    flat = centre.reshape(len(images), -1, 2)
    coef = np.stack(
        [np.linalg.lstsq(design, flat[i], rcond=None)[0][:2] for i in range(len(images))]
    )
    return coef / (255 / (SIZE - 1))  # slope 1 = the untouched ramp


def both_backends(settings: dict, images: np.ndarray, seed: int = 0):
    """(albumentations outputs, gpu-backend outputs) of one policy on the same images."""
    aug = parse(AugmentConfig, settings, "augment")
    base = BaseConfig(image_size=SIZE, channels=3, seed=seed)
    policies = build_policies(aug, base, ["a"])
    reseed(policies, seed)
    reference = np.stack([apply_policy(policies, image, 0) for image in images])
    augment = BatchAugment(aug, base, ["a"])
    labels = torch.zeros(len(images), dtype=torch.long)
    batch = augment(torch.from_numpy(images), labels, torch.Generator().manual_seed(seed))
    return reference, (batch.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255)


OFF = {name: {"p": 0.0} for name in transform_names()}


def assert_same_distribution(a: np.ndarray, b: np.ndarray, tolerance: float) -> None:
    assert abs(a.mean() - b.mean()) < tolerance, (a.mean(), b.mean())
    assert abs(a.std() - b.std()) < tolerance, (a.std(), b.std())
    assert ks_2samp(a, b).pvalue > 0.001


def test_rotation_angles_follow_the_same_distribution():
    settings = {**OFF, "rotate": {"p": 1.0, "limit": 12.0}}
    reference, gpu = both_backends(settings, ramps(600))
    angle = [
        np.degrees(np.arctan2(-g[:, 0, 1], g[:, 0, 0]))
        for g in (gradients(reference), gradients(gpu))
    ]
    assert np.abs(angle[0]).max() <= 12.5 and np.abs(angle[1]).max() <= 12.5
    assert_same_distribution(*angle, tolerance=0.6)  # degrees; uniform on (-12, 12) has std 6.9


def test_crop_scale_follows_the_same_distribution():
    settings = {**OFF, "crop": {"p": 1.0, "scale": [0.5, 1.0], "ratio": [0.75, 1.33]}}
    reference, gpu = both_backends(settings, ramps(600))
    # A crop keeping a share w of the width flattens the red ramp to slope w; area = w * h.
    area = [g[:, 0, 0] * g[:, 1, 1] for g in (gradients(reference), gradients(gpu))]
    assert_same_distribution(*area, tolerance=0.02)
    assert 0.5 - 0.03 < area[1].min() and area[1].max() < 1.03


def test_brightness_contrast_and_probability_follow_the_same_distribution():
    settings = {**OFF, "brightness_contrast": {"p": 0.5, "brightness": 0.2, "contrast": 0.2}}
    images = np.full((800, SIZE, SIZE, 3), 100, np.uint8)
    images[:, :, : SIZE // 2] = 160
    reference, gpu = both_backends(settings, images)
    means = [out.reshape(len(out), -1).mean(1) for out in (reference, gpu)]
    changed = [np.mean(np.abs(m - 130) > 0.5) for m in means]
    assert abs(changed[0] - changed[1]) < 0.08 and abs(changed[1] - 0.5) < 0.08
    assert_same_distribution(*means, tolerance=3.0)  # of 255


def test_exclusions_spare_their_class_and_labels_travel_with_their_images():
    aug = parse(
        AugmentConfig,
        {**OFF, "rotate": {"p": 1.0, "limit": 30.0}, "exclude": {"b": ["rotate"]}},
        "augment",
    )
    augment = BatchAugment(aug, BaseConfig(image_size=SIZE, channels=3), ["a", "b"])
    images = torch.from_numpy(ramps(64))
    labels = torch.arange(64) % 2
    before = labels.clone()
    out = augment(images, labels, torch.Generator().manual_seed(1))
    untouched = (out.permute(0, 2, 3, 1) * 255 - images.float()).abs().amax(dim=(1, 2, 3)) < 1e-3
    assert torch.equal(labels, before)
    assert untouched[labels == 1].all() and not untouched[labels == 0].any()


def test_same_seed_same_batch_and_nothing_to_do_is_the_identity():
    aug = parse(AugmentConfig, {}, "augment")  # every default transform
    augment = BatchAugment(aug, BaseConfig(image_size=SIZE, channels=3), ["a"])
    images, labels = torch.from_numpy(ramps(16)), torch.zeros(16, dtype=torch.long)
    first = augment(images, labels, torch.Generator().manual_seed(5))
    assert torch.equal(first, augment(images, labels, torch.Generator().manual_seed(5)))
    idle = BatchAugment(
        parse(AugmentConfig, OFF, "augment"), BaseConfig(image_size=SIZE, channels=3), ["a"]
    )
    assert torch.equal(
        idle(images, labels, torch.Generator()) * 255, images.permute(0, 3, 1, 2).float()
    )


@pytest.mark.parametrize("case", ["drawn", "nothing drawn", "a class that excludes all", "grey"])
def test_the_gpu_path_that_never_reads_back_gives_the_same_images(case):
    """On CUDA, apply runs every transform the policy can draw (the identity where a sample did
    not draw it) instead of reading the per-sample draws back; it must change nothing: not when
    no sample drew anything, nor for a class every transform spares, nor on grey images (where
    HSV does not apply)."""
    policy = {
        "crop": {"p": 0.5, "scale": [0.6, 1.0]},
        "rotate": {"p": 0.5, "limit": 20.0},
        "shear": {"p": 0.5, "limit": 10.0},
        "hflip": {"p": 0.5},
        "hsv": {"p": 0.5},
        "brightness_contrast": {"p": 0.5},
        "noise": {"p": 0.5},
        "blur": {"p": 0.5, "limit": 5},
        "exclude": {"b": list(transform_names())},
    }
    channels = 1 if case == "grey" else 3
    augment = BatchAugment(
        parse(AugmentConfig, policy, "augment"),
        BaseConfig(image_size=SIZE, channels=channels),
        ["a", "b"],
    )
    x = torch.from_numpy(ramps(64)[..., :channels]).permute(0, 3, 1, 2).float() / 255
    labels = torch.full((64,), int(case == "a class that excludes all"))
    params = augment.sample(labels, torch.Generator().manual_seed(3), x.device)
    if case == "nothing drawn":
        params.on = {name: torch.zeros_like(on) for name, on in params.on.items()}
    drawn = case in ("drawn", "grey")
    assert all(params.on[name].any() == drawn for name in transform_names() if name != "vflip")
    outputs = [
        augment.apply(x, params, torch.Generator().manual_seed(4), by_policy=by_policy)
        for by_policy in (False, True)
    ]
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5
    if not drawn:
        assert (outputs[1] - x).abs().max() < 1e-5
