"""The augment policy as batched tensor operations: the `gpu` augmentation backend.

On a fast GPU, per-sample albumentations on CPU workers cannot keep up with small images. This
module runs the same policy, read from the same `augment` params, on whole batches where the
batch lives (GPU or CPU): every sample draws its own random parameters, as albumentations does.

- crop, rotate, shear and flips are folded into one affine matrix per sample and applied with
  one `affine_grid` + `grid_sample` (bilinear, black outside the image, like the
  albumentations policy's constant border);
- HSV shifts, brightness/contrast, Gaussian noise and box blur follow, in params order.

Conventions match albumentations 2.x (checked pixel by pixel in tests/test_gpu_augment.py):
a positive rotation turns the image counter-clockwise on screen, shear takes independent x and
y angles from (-limit, limit), and the random resized crop keeps a share `scale` of the area
with aspect ratio `ratio` (log-uniform), resized back to the full image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.core.config import AugmentConfig, BaseConfig, transform_names

GEOMETRIC = ("crop", "rotate", "shear", "hflip", "vflip")


@dataclass
class BatchParams:
    """Per-sample random parameters of one batch; a transform's entries where `on` is False
    are ignored."""

    on: dict[str, torch.Tensor]  # transform name -> (N,) bool
    crop: torch.Tensor  # (N, 4): centre x, centre y, half width, half height in [-1, 1] units
    angle: torch.Tensor  # (N,) degrees
    shear: torch.Tensor  # (N, 2) degrees, x and y
    hsv: torch.Tensor  # (N, 3): hue in OpenCV units (180 = full turn), saturation, value /255
    alpha: torch.Tensor  # (N,) contrast factor
    beta: torch.Tensor  # (N,) brightness offset, share of the pixel range
    noise_std: torch.Tensor  # (N,) share of the pixel range
    blur: torch.Tensor  # (N,) odd kernel size


class BatchAugment:
    """Callable: uint8 images (N, H, W, C) and labels (N,) -> augmented float (N, C, H, W) in
    [0, 1]. Labels only select a class's exclusions; they are never changed."""

    def __init__(self, aug: AugmentConfig, base: BaseConfig, classes: list[str]):
        self.aug = aug
        self.size = base.image_size
        # transform -> (K,) bool: classes whose `augment.exclude` names it
        self.excluded = {
            name: torch.tensor([name in aug.exclude.get(c, ()) for c in classes], dtype=torch.bool)
            for name in transform_names()
        }
        self.active = [name for name in transform_names() if getattr(aug, name).p > 0]
        self.blur_kernels = tuple(range(3, (aug.blur.limit | 1) + 1, 2))  # odd: 3, 5, ..., limit

    def sample(
        self, labels: torch.Tensor, generator: torch.Generator, device: torch.device
    ) -> BatchParams:
        n = len(labels)
        if self.excluded[transform_names()[0]].device != device:  # once: no copy per batch
            self.excluded = {name: mask.to(device) for name, mask in self.excluded.items()}

        def uniform(low, high, *shape):
            return low + (high - low) * torch.rand(n, *shape, generator=generator, device=device)

        on = {}
        for name in transform_names():
            draw = torch.rand(n, generator=generator, device=device) < getattr(self.aug, name).p
            on[name] = draw & ~self.excluded[name][labels]
        kernels = len(self.blur_kernels)
        return BatchParams(
            on=on,
            crop=self._crop_boxes(uniform),
            angle=uniform(-self.aug.rotate.limit, self.aug.rotate.limit),
            shear=uniform(-self.aug.shear.limit, self.aug.shear.limit, 2),
            hsv=torch.stack(
                [
                    uniform(-self.aug.hsv.hue, self.aug.hsv.hue),
                    uniform(-self.aug.hsv.saturation, self.aug.hsv.saturation) / 255,
                    uniform(-self.aug.hsv.value, self.aug.hsv.value) / 255,
                ],
                dim=1,
            ),
            alpha=1
            + uniform(
                -self.aug.brightness_contrast.contrast, self.aug.brightness_contrast.contrast
            ),
            beta=uniform(
                -self.aug.brightness_contrast.brightness, self.aug.brightness_contrast.brightness
            ),
            noise_std=uniform(*self.aug.noise.std),
            blur=3 + 2 * torch.floor(uniform(0, kernels)).clamp_max(kernels - 1),
        )

    def _crop_boxes(self, uniform) -> torch.Tensor:
        """Random resized crop boxes, drawn as albumentations draws them: up to 10 tries of an
        area share from `scale` and a log-uniform aspect from `ratio` until the box fits, else
        the whole (square) image cut to the nearest allowed aspect."""
        scale, ratio = self.aug.crop.scale, self.aug.crop.ratio
        tries = 10
        area = uniform(*scale, tries)
        aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), tries))
        width, height = torch.sqrt(area * aspect), torch.sqrt(area / aspect)  # image shares
        fits = (width <= 1) & (height <= 1)
        first = fits.float().argmax(dim=1, keepdim=True)  # the first try that fits
        width, height = width.gather(1, first)[:, 0], height.gather(1, first)[:, 0]
        fallback = (
            (1.0, 1 / ratio[0]) if ratio[0] > 1 else (ratio[1], 1.0) if ratio[1] < 1 else (1.0, 1.0)
        )
        none_fit = ~fits.any(dim=1)
        width = torch.where(none_fit, fallback[0], width)
        height = torch.where(none_fit, fallback[1], height)
        cx = (1 - width) * (2 * uniform(0, 1) - 1)  # the box stays inside the image
        cy = (1 - height) * (2 * uniform(0, 1) - 1)
        cx, cy = torch.where(none_fit, 0.0, cx), torch.where(none_fit, 0.0, cy)
        return torch.stack([cx, cy, width, height], dim=1)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div_(255)
        if not self.active:
            return x
        return self.apply(x, self.sample(labels, generator, x.device), generator)

    def apply(
        self,
        x: torch.Tensor,
        p: BatchParams,
        generator: torch.Generator,
        *,
        by_policy: bool | None = None,
    ) -> torch.Tensor:
        """The transforms of `p` on float images (N, C, H, W) in [0, 1].

        On a CPU a transform no sample of the batch drew is skipped. On a GPU, reading that
        back would make the host wait for the stream at every step: there (or with `by_policy`)
        the policy decides, and a transform with p > 0 runs, as the identity where a sample did
        not draw it. For `p` drawn by `sample` both give the same images, up to float rounding;
        on that path a transform the policy cannot draw (p = 0, a blur kernel over the limit)
        does not run whatever `p` says.
        """
        by_policy = x.is_cuda if by_policy is None else by_policy
        if by_policy:
            runs = {name: name in self.active for name in transform_names()}
        else:
            runs = {name: bool(p.on[name].any()) for name in transform_names()}
        if any(runs[name] for name in GEOMETRIC):
            grid = F.affine_grid(sampling_matrices(p)[:, :2], list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if runs["hsv"] and x.shape[1] == 3:
            x = torch.where(_rows(p.on["hsv"]), shift_hsv(x, p.hsv), x)
        if runs["brightness_contrast"]:
            jittered = (x * _rows(p.alpha) + _rows(p.beta)).clamp_(0, 1)
            x = torch.where(_rows(p.on["brightness_contrast"]), jittered, x)
        if runs["noise"]:
            noise = torch.randn(x.shape, generator=generator, device=x.device) * _rows(p.noise_std)
            x = torch.where(_rows(p.on["noise"]), (x + noise).clamp_(0, 1), x)
        if runs["blur"]:
            sizes = self.blur_kernels if by_policy else None
            x = box_blur(x, torch.where(p.on["blur"], p.blur, torch.ones_like(p.blur)), sizes)
        return x


def _rows(values: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1), to broadcast one value per sample over an image batch."""
    return values.view(-1, 1, 1, 1)


def sampling_matrices(p: BatchParams) -> torch.Tensor:
    """(N, 3, 3): output pixel -> input pixel, in affine_grid's [-1, 1] coordinates.

    The image goes through crop, rotate, shear, hflip, vflip in that order, so the sampling
    matrix is crop . rotate^-1 . shear^-1 . flip^-1 (each the identity where it is off).
    """
    n, device = len(p.angle), p.angle.device
    eye = torch.eye(3, device=device).expand(n, 3, 3)

    def where(on, matrix):
        return torch.where(on.view(-1, 1, 1), matrix, eye)

    crop = eye.clone()
    crop[:, 0, 0], crop[:, 1, 1] = p.crop[:, 2], p.crop[:, 3]
    crop[:, 0, 2], crop[:, 1, 2] = p.crop[:, 0], p.crop[:, 1]
    theta = torch.deg2rad(p.angle)
    cos, sin = torch.cos(theta), torch.sin(theta)
    unrotate = eye.clone()  # the inverse of the on-screen counter-clockwise turn [[c, s], [-s, c]]
    unrotate[:, 0, 0], unrotate[:, 0, 1], unrotate[:, 1, 0], unrotate[:, 1, 1] = cos, -sin, sin, cos
    tx, ty = torch.tan(torch.deg2rad(p.shear[:, 0])), torch.tan(torch.deg2rad(p.shear[:, 1]))
    shear = eye.clone()  # forward shear [[1, -tx], [-ty, 1]], as albumentations' Affine
    shear[:, 0, 1], shear[:, 1, 0] = -tx, -ty
    flip = eye.clone()
    flip[:, 0, 0] = torch.where(p.on["hflip"], -1.0, 1.0)
    flip[:, 1, 1] = torch.where(p.on["vflip"], -1.0, 1.0)
    return (
        where(p.on["crop"], crop)
        @ where(p.on["rotate"], unrotate)
        @ where(p.on["shear"], torch.linalg.inv_ex(shear).inverse)  # inv() checks: a GPU wait
        @ flip
    )


def shift_hsv(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift hue (OpenCV units: 180 is a full turn), saturation and value of RGB images."""
    r, g, b = x.unbind(1)
    value, _ = x.max(1)
    low, _ = x.min(1)
    chroma = value - low
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    safe = chroma.clamp_min(1e-12)
    hue = torch.where(
        value == r,
        ((g - b) / safe) % 6,
        torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))  # [0, 1) of a turn
    per_image = shift.view(-1, 3, 1, 1)
    hue = (hue + per_image[:, 0] / 180) % 1.0
    saturation = (saturation + per_image[:, 1]).clamp(0, 1)
    value = (value + per_image[:, 2]).clamp(0, 1)
    # HSV -> RGB
    k = torch.stack([(5 + hue * 6) % 6, (3 + hue * 6) % 6, (1 + hue * 6) % 6], dim=1)
    weight = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return value.unsqueeze(1) - (value * saturation).unsqueeze(1) * weight


def box_blur(
    x: torch.Tensor, kernel: torch.Tensor, sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """Mean filter with a per-sample odd kernel size (1 = untouched), reflected borders.

    `sizes`: every size `kernel` may hold, when known; then each is applied to the whole batch
    and selected per sample, without reading `kernel` back from the device."""
    if sizes is not None:
        out = x
        for size in sizes:
            padded = F.pad(x, [size // 2] * 4, mode="reflect")
            out = torch.where(_rows(kernel == size), F.avg_pool2d(padded, size, stride=1), out)
        return out
    out = x.clone()
    for size in kernel.unique().tolist():
        size = int(size)
        if size <= 1:
            continue
        rows = kernel == size
        padded = F.pad(x[rows], [size // 2] * 4, mode="reflect")
        out[rows] = F.avg_pool2d(padded, size, stride=1)
    return out
