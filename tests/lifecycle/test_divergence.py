"""The drift statistics on distributions whose figures are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backend.lifecycle import divergence


def test_psi_and_jensen_shannon_of_two_category_mixes() -> None:
    # reference 50/50, current 90/10:
    # PSI = 0.4 ln(0.9/0.5) + 0.4 ln(0.5/0.1) = 0.87889
    # JS distance (base 2) = sqrt(H(0.7, 0.3) - (H(0.5, 0.5) + H(0.9, 0.1)) / 2) = 0.38313
    figures = divergence.categorical(["a"] * 50 + ["b"] * 50, ["a"] * 90 + ["b"] * 10)
    assert figures["psi"] == pytest.approx(0.4 * math.log(1.8) + 0.4 * math.log(5), abs=1e-3)
    assert figures["psi"] == pytest.approx(0.87889, abs=1e-3)
    assert figures["js"] == pytest.approx(0.38313, abs=1e-4)


def test_the_same_sample_has_not_drifted() -> None:
    values = np.arange(1000, dtype=float)
    figures = divergence.numeric(values, values.copy())
    assert figures == {"psi": pytest.approx(0, abs=1e-9), "js": 0.0, "ks": 0.0}
    assert divergence.categorical(["x", "y"] * 10, ["y", "x"] * 10)["psi"] == pytest.approx(0)


def test_a_reference_of_one_value_tells_larger_and_smaller_values_apart() -> None:
    reference = np.full(100, 4.0)
    # all of the current window in a bin the reference never filled: 1 ln(1 / 1e-4) + ...
    for current in (np.full(100, 430.0), np.full(100, 1.0)):
        assert divergence.numeric(reference, current)["psi"] > 9
    assert divergence.numeric(reference, reference.copy())["psi"] == pytest.approx(0)


def test_kolmogorov_smirnov_of_a_shifted_uniform_sample() -> None:
    # 0..99 against 50..149: the CDFs differ by at most a half
    figures = divergence.numeric(np.arange(100.0), np.arange(100.0) + 50)
    assert figures["ks"] == pytest.approx(0.5)


def test_a_new_category_counts_with_its_floor_not_infinitely() -> None:
    figures = divergence.categorical(["cat"] * 100, ["cat"] * 50 + ["dog"] * 50)
    assert math.isfinite(figures["psi"])
    # (0.5 - 1) ln(0.5 / 1) + (0.5 - 1e-4) ln(0.5 / 1e-4): about 4.6, far over any threshold
    assert figures["psi"] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(5000), rel=0.01)


def test_psi_of_a_normal_shifted_by_half_a_standard_deviation() -> None:
    # For two unit normals PSI tends to the symmetric KL divergence, the squared shift (0.25);
    # ten quantile bins lose a little of it.
    rng = np.random.default_rng(7)
    reference = rng.normal(0.0, 1.0, 200_000)
    current = rng.normal(0.5, 1.0, 200_000)
    figures = divergence.numeric(reference, current)
    assert 0.21 < figures["psi"] < 0.25
    assert figures["ks"] == pytest.approx(0.197, abs=0.005)  # 2 Phi(0.25) - 1
    small = divergence.numeric(reference, rng.normal(0.05, 1.0, 200_000))
    assert small["psi"] < 0.01


def test_centroid_distance_and_mmd_of_embeddings() -> None:
    east = np.tile([1.0, 0.0], (20, 1))
    north = np.tile([0.0, 1.0], (20, 1))
    north_east = np.tile([1.0, 1.0], (20, 1))
    assert divergence.centroid_distance(east, north) == pytest.approx(1.0)
    assert divergence.centroid_distance(east, north_east) == pytest.approx(1 - 1 / math.sqrt(2))
    assert divergence.centroid_distance(east, east) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(3)
    cloud = rng.normal(size=(200, 8))
    assert divergence.mmd(cloud, cloud) == pytest.approx(0.0, abs=1e-12)
    assert divergence.mmd(cloud, cloud + 3.0) > 10 * divergence.mmd(
        cloud[:100], rng.normal(size=(100, 8))
    )
