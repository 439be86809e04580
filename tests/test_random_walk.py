from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.common.random_walk import (
    affinity_matrix,
    matrix_power,
    pair_grid,
    pair_offsets,
    random_walk,
    sparse_transition_matrix,
    transition_matrix,
)


def test_pair_offsets_half_disk_radius5():
    offs = pair_offsets(5)
    assert len(offs) == 34  # 4 + 9 + 9 + 7 + 5, as in AffinityNet
    assert len(set(offs)) == 34
    for dy, dx in offs:
        assert 0 < dy * dy + dx * dx < 25
        assert dy > 0 or (dy == 0 and dx > 0)  # one direction of each unordered pair
    # the full disk is the half-disk and its mirror, nothing missing
    full = {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if 0 < dy * dy + dx * dx < 25}
    assert set(offs) | {(-dy, -dx) for dy, dx in offs} == full


def test_pair_grid_lists_every_close_pair_once():
    h, w, r = 4, 5, 3
    g = pair_grid(h, w, r)
    got = {tuple(sorted((int(s), int(d)))) for s, d in zip(g.src, g.dst)}
    assert len(got) == g.num_pairs  # no duplicates
    expected = set()
    for i in range(h * w):
        for j in range(i + 1, h * w):
            (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
            if (yi - yj) ** 2 + (xi - xj) ** 2 < r * r:
                expected.add((i, j))
    assert got == expected


def _random_affinity(h: int, w: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = pair_grid(h, w, 5)
    return torch.rand(n, g.num_pairs, generator=torch.Generator().manual_seed(seed))


def test_affinity_symmetric_with_self_loops_and_t_row_stochastic():
    h, w = 6, 7
    aff = _random_affinity(h, w)
    g = pair_grid(h, w, 5)
    a = affinity_matrix(aff, g, beta=8)
    assert torch.equal(a, a.transpose(1, 2))
    assert torch.all(a.diagonal(dim1=1, dim2=2) == 1)
    # beta is applied: an entry equals a_ij ** 8
    i, j = int(g.src[3]), int(g.dst[3])
    assert a[0, i, j].item() == pytest.approx(aff[0, 3].item() ** 8, rel=1e-5)
    # nodes farther apart than the radius are not connected
    assert a[0, 0, 5 * w + 6].item() == 0.0
    t = transition_matrix(aff, g, beta=8)
    assert torch.allclose(t.sum(dim=2), torch.ones(2, h * w), atol=1e-6)
    ts = sparse_transition_matrix(aff, g, beta=8).to_dense()
    assert torch.allclose(ts[: h * w, : h * w], t[0], atol=1e-6)
    assert torch.allclose(ts[h * w :, h * w :], t[1], atol=1e-6)
    assert ts[: h * w, h * w :].abs().sum() == 0  # images never mix
    assert torch.allclose(ts.sum(dim=1), torch.ones(2 * h * w), atol=1e-6)


def test_dense_equals_sparse():
    h, w = 9, 8
    aff = _random_affinity(h, w, n=3, seed=1)
    maps = torch.rand(3, 2, h, w, generator=torch.Generator().manual_seed(2))
    dense = random_walk(maps, aff, beta=8, t=256, mode="dense")
    sparse = random_walk(maps, aff, beta=8, t=256, mode="sparse")
    assert torch.allclose(dense, sparse, atol=1e-5)
    # auto picks one of them and agrees
    assert torch.allclose(random_walk(maps, aff, mode="auto"), dense, atol=1e-5)
    # t steps is not the identity: the maps were smoothed
    assert (dense - maps).abs().max() > 0.05


def test_squaring_equals_explicit_products():
    h, w = 5, 5
    g = pair_grid(h, w, 5)
    aff = _random_affinity(h, w, n=1, seed=3)
    t = transition_matrix(aff, g, beta=2).double()
    for steps in (1, 2, 5, 16, 37):
        explicit = torch.eye(h * w, dtype=torch.float64).unsqueeze(0)
        for _ in range(steps):
            explicit = torch.bmm(explicit, t)
        assert torch.allclose(matrix_power(t, steps), explicit, atol=1e-10)
    assert torch.allclose(matrix_power(t, 0)[0], torch.eye(h * w, dtype=torch.float64))


def _wall_affinity(h: int, w: int, wall_col: int) -> torch.Tensor:
    """Affinity 1 everywhere except 0 for pairs crossing between column < wall and >= wall."""
    g = pair_grid(h, w, 5)
    xs, xd = g.src % w, g.dst % w
    crosses = (xs < wall_col) != (xd < wall_col)
    return torch.where(crosses, 0.0, 1.0).unsqueeze(0)


def test_seed_spreads_within_region_not_across_boundary():
    h, w, wall = 12, 12, 6
    aff = _wall_affinity(h, w, wall)
    maps = torch.zeros(1, 1, h, w)
    maps[0, 0, 2, 1] = 1.0  # a single seed in the left region
    for mode in ("dense", "sparse"):
        out = random_walk(maps, aff, beta=8, t=256, mode=mode)[0, 0]
        left, right = out[:, :wall], out[:, wall:]
        assert torch.all(right == 0), mode  # nothing crosses the zero-affinity wall
        # the seed's mass spread over the whole connected region, nearly uniformly
        assert left.min() > 0.5 * left.mean(), mode
        assert out[11, 5] > 0  # the far corner of the left region was reached
        assert out[2, 1] < 0.5  # and the seed itself was diluted


def test_walk_keeps_values_in_range_and_rejects_bad_shapes():
    h, w = 4, 4
    aff = _random_affinity(h, w, n=2)
    maps = torch.rand(2, 3, h, w)
    out = random_walk(maps, aff)
    assert out.shape == maps.shape
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="affinity must have shape"):
        random_walk(maps, aff[:, :-1])
    with pytest.raises(ValueError, match="unknown random walk mode"):
        random_walk(maps, aff, mode="magic")
    with pytest.raises(ValueError, match="maps must be"):
        random_walk(maps[0], aff)


def test_constant_map_is_a_fixed_point():
    h, w = 6, 6
    aff = _random_affinity(h, w, n=1, seed=5)
    maps = torch.full((1, 1, h, w), 0.3)
    out = random_walk(maps, aff, mode="sparse")
    np.testing.assert_allclose(out.numpy(), 0.3, atol=1e-6)
