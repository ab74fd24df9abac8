"""Near copies: the same picture under other bytes (re-encoded, resized, cropped, re-saved).

The exact blockwise search over image signatures (images.signature, stored in signatures.npy
beside packed images), the check of colour and contrast that makes a near shape a copy, the
data's own cutoff for "near" and the rows of a leakage table (see docs/near-copies.md).
"""

from __future__ import annotations

import numpy as np

from pipeline.data.images import SHAPE_SIZE

SIGNATURES = "signatures.npy"
LEAKAGE_COLUMNS = ["path", "split", "copy_of", "copy_split", "distance", "kind", "action"]
SAMPLE = 2000  # rows whose nearest neighbour sets the scale of "near"
CHUNK_ROWS = 256  # query rows per similarity block: 256 x 100k float32 = 100 MiB


CANDIDATES = 5  # nearest shapes checked for colour and contrast
COLOUR_TOLERANCE = 0.03  # most a copy's mean red, green or blue moves (0..1)
CONTRAST_RATIO = 1.5  # most a copy's contrast changes, either way


def nearest(
    queries: np.ndarray, pool: np.ndarray, exclude_self: bool = False, k: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(indices (N, k) of the k pool rows nearest in shape, their cosine distances (N, k)),
    nearest first, for each query signature (k=1: (N,) arrays).

    Exact and blockwise: CHUNK_ROWS queries against the whole pool at a time, so memory stays
    bounded; the cost grows with len(queries) * len(pool). With exclude_self, queries are the
    pool's own first rows and a row is never its own neighbour.
    """
    pool = np.asarray(pool[:, :SHAPE_SIZE], np.float32)
    k_found = min(k, len(pool) - int(exclude_self))
    index = np.full((len(queries), k), -1, np.int64)
    distance = np.full((len(queries), k), np.inf, np.float32)
    if k_found > 0:
        for start in range(0, len(queries), CHUNK_ROWS):
            block = np.asarray(queries[start : start + CHUNK_ROWS, :SHAPE_SIZE], np.float32)
            block = block @ pool.T
            if exclude_self:
                rows = np.arange(start, start + len(block))
                block[rows - start, rows] = -np.inf
            top = np.argpartition(-block, k_found - 1, axis=1)[:, :k_found]
            sims = np.take_along_axis(block, top, 1)
            order = np.argsort(-sims, axis=1)
            index[start : start + len(block), :k_found] = np.take_along_axis(top, order, 1)
            distance[start : start + len(block), :k_found] = 1.0 - np.take_along_axis(
                sims, order, 1
            )
    return (index[:, 0], distance[:, 0]) if k == 1 else (index, distance)


def copies_of(
    queries: np.ndarray, pool: np.ndarray, cutoff: float, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(index of the pool row each query is a copy of, or -1; the shapes' distance): the
    nearest of the CANDIDATES closest shapes within `cutoff` whose colour and contrast agree."""
    index, distance = nearest(queries, pool, exclude_self, k=CANDIDATES)
    partner = np.full(len(queries), -1, np.int64)
    found = np.full(len(queries), np.inf, np.float32)
    for q, p in zip(*np.nonzero((distance <= cutoff) & (index >= 0))):
        if partner[q] >= 0:
            continue  # a nearer candidate already matched
        a = np.asarray(queries[q, SHAPE_SIZE:], np.float32)
        b = np.asarray(pool[index[q, p], SHAPE_SIZE:], np.float32)
        contrast = max(a[3], b[3], 1e-3) / max(min(a[3], b[3]), 1e-3)
        if np.abs(a[:3] - b[:3]).max() <= COLOUR_TOLERANCE and contrast <= CONTRAST_RATIO:
            partner[q], found[q] = index[q, p], distance[q, p]
    return partner, found


def near_copy_cutoff(looks: np.ndarray, ratio: float, cap: float, seed: int) -> float:
    """Cosine distance under which two signatures are one picture: `ratio` times the median
    distance from an image to its nearest other image (a sample of SAMPLE), at most `cap`.

    How close distinct images lie depends on the data (8-px digits crowd together, photos do
    not); measured on real images, copies sit far below the median, distinct images above a
    fifth of it (see docs/near-copies.md).
    """
    if len(looks) < 3:
        return 0.0
    rng = np.random.default_rng(seed)
    sample = rng.permutation(len(looks))[:SAMPLE]
    order = np.concatenate([sample, np.setdiff1d(np.arange(len(looks)), sample)])
    _, distance = nearest(looks[sample], looks[order], exclude_self=True)
    return float(min(cap, ratio * np.median(distance)))


def leak(path, split, copy_of, copy_split, distance, kind, action="kept out of training") -> dict:
    """One row of a leakage table: an image set aside as a copy of a test image."""
    return dict(zip(LEAKAGE_COLUMNS, (path, split, copy_of, copy_split, distance, kind, action)))
