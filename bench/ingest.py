"""Ingest throughput and peak memory on generated 28x28 PNGs (10k and 100k by default), or
on phone-size photos (--photos N).

Each size is ingested in a fresh child process, so its peak RSS is its own. The figure that
matters is peak RSS minus the process's RSS before ingest started, compared with the size of
the packed array: ingest streams decoded images into a memory-mapped file instead of holding
them as PIL objects, so the overhead must stay bounded as N grows.

    python bench/ingest.py [--sizes 10000 100000] [--out bench/results/ingest.json]

--photos N writes N 12-MP JPEGs (4000x3000, quality 90, a quarter of them turned by EXIF as a
phone held upright stores them) cut from the photographs scikit-learn ships, then decodes them,
each way in a fresh child process, at `base.image_size` --image-size (64) in colour: the old
path (full-size decode, one process), JPEG draft decoding in one process, draft decoding in
the worker processes ingest now starts (pack.decode_workers), and the whole ingest stage.
It prints images/s, images/s per decoding process and per CPU-second, and the speed-ups over
the old path. --data DIR keeps the files in DIR and reuses them on the next run (any folder of
data/labeled/<class>/ images works, e.g. one kept by --keep).

    python bench/ingest.py --photos [N, default 200] [--data /tmp/photos] [--out bench/results/ingest_photos.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def generate(data: Path, n: int, seed: int = 0) -> None:
    """n distinct 28x28 grayscale PNGs in 10 class folders (digits upscaled, plus noise)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    base = np.stack(
        [
            np.asarray(Image.fromarray((d * 16).clip(0, 255).astype(np.uint8)).resize((28, 28)))
            for d in digits.images
        ]
    )
    for c in range(10):
        (data / "labeled" / str(c)).mkdir(parents=True, exist_ok=True)
    picks = rng.integers(0, len(base), n)
    for i, k in enumerate(picks):
        noisy = np.clip(base[k].astype(np.int16) + rng.integers(-20, 21, (28, 28)), 0, 255).astype(
            np.uint8
        )
        Image.fromarray(noisy).save(
            data / "labeled" / str(digits.target[k]) / f"img_{i:06d}.png", compress_level=1
        )


PHOTO_SIZE = (4000, 3000)  # 12 MP, as a phone's main camera
GRAIN = 3.0  # sensor-like noise (grey levels, std): about 2.2 MB a file at quality 90, where a
#   smooth upscaled photo would be 1.4 MB; entropy decoding, which a draft cannot skip, grows with it


def generate_photos(data: Path, n: int, seed: int = 0) -> None:
    """n distinct 12-MP JPEGs in two classes (china, flower): random crops of scikit-learn's
    sample photographs, shifted and upscaled, with grain; every 4th carries EXIF orientation 6."""
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.data.pack import decode_workers

    for name in ("china", "flower"):
        (data / "labeled" / name).mkdir(parents=True, exist_ok=True)
    jobs = [(data, i, seed) for i in range(n)]
    with ProcessPoolExecutor(decode_workers(n)) as pool:
        list(pool.map(_write_photo, jobs, chunksize=4))


def _write_photo(job: tuple[Path, int, int]) -> None:
    from sklearn.datasets import load_sample_image

    data, i, seed = job
    rng = np.random.default_rng([seed, i])
    name = ("china", "flower")[i % 2]
    source = load_sample_image(f"{name}.jpg")  # 427 x 640
    height, width = source.shape[:2]
    crop_w = int(width * rng.uniform(0.75, 1.0))
    crop_h = min(height, int(crop_w * 3 / 4))
    left, top = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
    crop = Image.fromarray(source[top : top + crop_h, left : left + crop_w])
    pixels = np.asarray(crop.resize(PHOTO_SIZE, Image.Resampling.BICUBIC), np.int16)
    pixels = pixels + rng.normal(0, GRAIN, (*pixels.shape[:2], 1)).round().astype(np.int16)
    exif = Image.Exif()
    if i % 4 == 3:
        exif[0x0112] = 6  # displayed turned: 3000 wide, 4000 tall
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
        data / "labeled" / name / f"photo_{i:05d}.jpg", quality=90, exif=exif.tobytes()
    )


PHOTO_MODES = {  # name: (pack options, what it is)
    "old": ({"draft": False, "workers": 1}, "full-size decode, 1 process (before)"),
    "draft": ({"draft": True, "workers": 1}, "draft decode, 1 process"),
    "new": ({}, "draft decode, worker processes (now)"),
    "stage": (None, "the whole ingest stage (now)"),
}


def photo_child(data: Path, out: Path, mode: str, image_size: int, channels: int) -> None:
    """Decode data/labeled the `mode` way here; print seconds, CPU seconds and peak RSS as JSON."""
    sys.path.insert(0, str(ROOT))
    os.environ["TQDM_DISABLE"] = "1"
    from pipeline.core.config import load_params
    from pipeline.data import pack, scan
    from pipeline.stages import ingest

    params = load_params(
        ROOT / "params.yaml", {"base.image_size": image_size, "base.channels": channels}
    )
    options = PHOTO_MODES[mode][0]
    candidates, _ = scan.scan_folder(data, "labeled", by_class=True, split="train")
    workers = pack.decode_workers(len(candidates)) if options in (None, {}) else 1
    before = _cpu_seconds()
    start = time.perf_counter()
    if options is None:
        ingest.run(data, out, params)
    else:
        limit = params.ingest.max_image_pixels
        pack.pack(candidates, data, out, params.base, limit, split="train", **options)
    seconds = time.perf_counter() - start
    n = len(candidates)  # every file is decoded, whatever ingest keeps afterwards
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(
        json.dumps(
            {
                "images": n,
                "seconds": seconds,
                "cpu_seconds": _cpu_seconds() - before,
                "workers": workers,
                "peak_rss_mib": self_kib / 1024,
                "worker_peak_rss_mib": workers_kib / 1024 if workers > 1 else None,
            }
        )
    )


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the decoding workers)."""
    own, kids = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def photos(args: argparse.Namespace) -> None:
    """Generate (or reuse) the photos, decode them every PHOTO_MODES way, print and save."""
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        made = "reused"
        if not (data / "labeled").is_dir():
            t0 = time.perf_counter()
            generate_photos(data, args.photos)
            made = f"generated in {time.perf_counter() - t0:.0f} s"
        files = sorted((data / "labeled").rglob("*.*"))
        mb = sum(f.stat().st_size for f in files) / len(files) / 1e6
        print(
            f"{len(files)} files, {mb:.1f} MB each on average ({made}); "
            f"base.image_size {args.image_size}, channels {args.channels}; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
            flush=True,
        )
        rows = {}
        for mode, (_, what) in PHOTO_MODES.items():
            command = [sys.executable, __file__, "--photo-child", str(data), str(Path(tmp) / mode)]
            command += [mode, str(args.image_size), str(args.channels)]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            r = json.loads(result.stdout.strip().splitlines()[-1])
            r |= {
                "mode": mode,
                "what": what,
                "images_per_s": r["images"] / r["seconds"],
                "images_per_s_per_process": r["images"] / r["seconds"] / r["workers"],
                "images_per_cpu_s": r["images"] / r["cpu_seconds"],
            }
            r["speedup_over_old"] = r["images_per_s"] / rows["old"]["images_per_s"] if rows else 1.0
            rows[mode] = r
            print(
                f"{what:<40} {r['images_per_s']:6.1f} img/s  {r['workers']} process(es): "
                f"{r['images_per_s_per_process']:5.1f} img/s each, {r['images_per_cpu_s']:5.1f} "
                f"img/CPU-s  x{r['speedup_over_old']:.1f}  ({r['images']} images, "
                f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB)",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(list(rows.values()), indent=2) + "\n")


def child(data: Path, out: Path) -> None:
    """Run ingest here and print seconds, baseline and peak RSS as JSON."""
    sys.path.insert(0, str(ROOT))
    os.environ["TQDM_DISABLE"] = "1"
    from pipeline.core.config import load_params
    from pipeline.stages import ingest

    params = load_params(ROOT / "params.yaml", {"base.image_size": 28, "base.channels": 1})
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    metrics = ingest.run(data, out, params)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = metrics["train_images"] + metrics["test_images"]
    print(json.dumps({"images": n, "seconds": seconds, "baseline_kib": baseline, "peak_kib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    parser.add_argument("--keep", type=Path, help="move the largest generated data folder here")
    parser.add_argument(
        "--photos", type=int, nargs="?", const=200, help="benchmark N (200) generated 12-MP JPEGs"
    )
    parser.add_argument("--data", type=Path, help="--photos: reuse the folder, or generate into it")
    parser.add_argument("--image-size", type=int, default=64, help="--photos: base.image_size")
    parser.add_argument("--channels", type=int, default=3, help="--photos: base.channels")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--photo-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.photo_child:
        data, out, mode, size, channels = args.photo_child
        return photo_child(Path(data), Path(out), mode, int(size), int(channels))
    if args.photos:
        if args.out == parser.get_default("out"):
            args.out = args.out.with_name("ingest_photos.json")
        return photos(args)
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            t0 = time.perf_counter()
            generate(data, n)
            gen = time.perf_counter() - t0
            result = subprocess.run(
                [sys.executable, __file__, "--child", str(data), str(Path(tmp) / "out")],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(result.stdout.strip().splitlines()[-1])
            if args.keep and n == max(args.sizes):
                shutil.move(data, args.keep)
        array_mib = r["images"] * 28 * 28 / 2**20
        overhead = (r["peak_kib"] - r["baseline_kib"]) / 1024
        rows.append(
            {
                "images": r["images"],
                "images_per_s": r["images"] / r["seconds"],
                "seconds": r["seconds"],
                "peak_rss_mib": r["peak_kib"] / 1024,
                "rss_growth_mib": overhead,
                "packed_array_mib": array_mib,
                "growth_over_array": overhead / array_mib,
                "generate_seconds": gen,
            }
        )
        print(
            f"{r['images']:>7} images: {rows[-1]['images_per_s']:8.0f} img/s, peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB "
            f"(+{overhead:.0f} MiB during ingest; packed array {array_mib:.0f} MiB)",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
