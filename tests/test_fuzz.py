"""Fuzzing the boundaries users feed: params files, image bytes, CSV manifests.

The only allowed outcomes are a value, a quarantine reason (Rejected) or one clear
PipelineError; any other exception is a bug.
"""

import io
import string

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.data.images import Rejected, decode
from pipeline.data.scan import read_csv_manifest

from .conftest import ROOT

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 20), max_size=4),
)


def _paths(node, prefix=()):
    for key, value in node.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


PARAM_PATHS = list(_paths(PARAMS))


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(PARAM_PATHS), scalars), min_size=1, max_size=4))
def test_params_loader_accepts_or_names_the_key(tmp_path, changes, record):
    raw = yaml.safe_load(yaml.safe_dump(PARAMS))
    for path, value in changes:
        node = raw
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):  # an earlier change may have replaced a whole section
            node[path[-1]] = value
    target = tmp_path / "params.yaml"
    target.write_text(yaml.safe_dump(raw))
    what = "params.yaml with 1-4 random values at real keys (hypothesis)"
    try:
        load_params(target)
    except PipelineError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
        # "train.lr: ...", "augment.crop.scale[0]: ...", "params.yaml: unknown key ..."
        head = str(exc).split(":")[0]
        assert head == "params.yaml" or head.split(".")[0] in PARAMS, str(exc)
        record("params", what, "refused with one line naming the key")
    else:
        record("params", what, "accepted (valid values)")


@FUZZ
@given(text=st.text(max_size=300))
def test_params_loader_survives_arbitrary_text(tmp_path, text, record):
    target = tmp_path / "params.yaml"
    target.write_text(text)
    what = "params.yaml of random text (hypothesis)"
    try:
        load_params(target)
    except PipelineError:
        record("params", what, "refused with one error line")
    else:
        record("params", what, "accepted (valid by chance)")


def _png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (6, 5), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=2000),
        st.builds(
            lambda s, cut, flip: (
                lambda b: b[:cut] + bytes([b[cut % len(b)] ^ flip]) + b[cut + 1 :]
            )(_png_bytes(s)),
            st.integers(0, 50),
            st.integers(0, 200),
            st.integers(1, 255),
        ),
    )
)
def test_random_bytes_decode_or_are_rejected_with_a_reason(data, record):
    what = "random bytes and bit-flipped PNGs as image files (hypothesis)"
    try:
        decoded = decode(data, image_size=8, channels=1, resize="pad", max_pixels=10_000)
    except Rejected as exc:
        assert str(exc)
        record("input", what, "quarantined with a reason")
    else:
        assert decoded.pixels.shape == (8, 8, 1) and decoded.pixels.dtype == np.uint8
        record("input", what, "decoded to a valid image")


path_text = st.text(alphabet=string.ascii_letters + string.digits + "./\\:_- ,\"'\n", max_size=30)


@FUZZ
@given(rows=st.lists(st.tuples(path_text, path_text), max_size=8), header=st.booleans())
def test_random_csv_manifests_give_candidates_quarantine_or_an_error(
    tmp_path, rows, header, record
):
    data = tmp_path / "data"
    (data / "labeled").mkdir(parents=True, exist_ok=True)
    (data / "labeled" / "ok.png").write_bytes(_png_bytes(0))
    csv_path = data / "labeled" / "labels.csv"
    lines = (["path,label"] if header else []) + [f"{p},{lbl}" for p, lbl in rows]
    csv_path.write_text("\n".join(lines) + "\n")
    what = "random CSV manifests: odd paths, quotes, escapes (hypothesis)"
    try:
        candidates, quarantine = read_csv_manifest(data, csv_path, "labeled")
    except PipelineError:
        record("input", what, "refused with one error line")
        return
    for cand in candidates:
        resolved = (data / cand.path).resolve()
        assert data.resolve() in resolved.parents  # never a path outside data/
    assert all(q["reason"] for q in quarantine)
    record("input", what, "rows confined to data/ or quarantined with a reason")
