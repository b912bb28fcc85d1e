"""How far a current sample has moved from a reference sample: PSI, Kolmogorov-Smirnov,
Jensen-Shannon (numbers and categories) and the distance between two sets of embeddings.

Pure functions on numpy arrays (CPU work: callers run them off the event loop)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

# A bin that one side never fills would make PSI infinite: every share is at least this.
_FLOOR = 1e-4


def _shares(counts: np.ndarray) -> np.ndarray:
    shares = counts / max(counts.sum(), 1)
    shares = np.maximum(shares, _FLOOR)
    return shares / shares.sum()


def _psi(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def numeric_bins(reference: np.ndarray, bins: int) -> np.ndarray:
    """Lower edges of the bins: the reference's minimum and its inner quantiles (each bin holds
    about as much of it), repeated edges merged (a reference of few distinct values gets
    fewer bins)."""
    return np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[:-1]))


def _bin_counts(values: np.ndarray, edges: np.ndarray, top: float) -> np.ndarray:
    # 0: below the reference's minimum; i: [edges[i-1], edges[i]); the last: above its
    # maximum (so a reference of one value still tells smaller from larger values)
    index = np.searchsorted(edges, values, side="right")
    index = np.where(values > top, len(edges) + 1, index)
    return np.bincount(index, minlength=len(edges) + 2).astype(float)


def numeric_histograms(
    reference: np.ndarray, current: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """The shares of both samples in the reference's quantile bins (floored, summing to 1)."""
    edges = numeric_bins(reference, bins)
    top = float(reference.max())
    return _shares(_bin_counts(reference, edges, top)), _shares(_bin_counts(current, edges, top))


def categorical_histograms(
    reference: Sequence[str], current: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The shares of every category either sample holds (floored, summing to 1)."""
    categories = sorted(set(reference) | set(current))
    index = {c: i for i, c in enumerate(categories)}
    ref = np.bincount([index[c] for c in reference], minlength=len(categories))
    cur = np.bincount([index[c] for c in current], minlength=len(categories))
    return _shares(ref.astype(float)), _shares(cur.astype(float))


def numeric(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> dict[str, float]:
    """PSI and Jensen-Shannon distance (base 2: 0 to 1) over the reference's quantile bins,
    and the Kolmogorov-Smirnov statistic (the largest gap between the two CDFs)."""
    ref, cur = numeric_histograms(reference, current, bins)
    return {
        "psi": _psi(ref, cur),
        "js": float(jensenshannon(ref, cur, base=2)),
        "ks": float(ks_2samp(reference, current).statistic),
    }


def categorical(reference: Sequence[str], current: Sequence[str]) -> dict[str, float]:
    """PSI and Jensen-Shannon distance (base 2) of the two samples' category shares."""
    ref, cur = categorical_histograms(reference, current)
    return {"psi": _psi(ref, cur), "js": float(jensenshannon(ref, cur, base=2))}


def centroid_distance(reference: np.ndarray, current: np.ndarray) -> float:
    """The cosine distance (0 to 2) between the mean vectors of two sets of embeddings
    (rows)."""
    a, b = reference.mean(axis=0), current.mean(axis=0)
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0:
        return 0.0
    return float(1.0 - np.dot(a, b) / norms)


def mmd(reference: np.ndarray, current: np.ndarray, gamma: float | None = None) -> float:
    """The squared maximum mean discrepancy with an RBF kernel (biased estimate; `gamma`
    defaults to 1 / the median squared distance between reference rows)."""

    def sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
        return np.maximum(d, 0.0)

    if gamma is None:
        within = sq_dists(reference, reference)
        median = (
            float(np.median(within[np.triu_indices_from(within, k=1)])) if len(within) > 1 else 0
        )
        gamma = 1.0 / median if median > 0 else 1.0
    kxx = np.exp(-gamma * sq_dists(reference, reference)).mean()
    kyy = np.exp(-gamma * sq_dists(current, current)).mean()
    kxy = np.exp(-gamma * sq_dists(reference, current)).mean()
    return float(max(kxx + kyy - 2 * kxy, 0.0))
