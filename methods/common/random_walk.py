"""Random walk with pairwise semantic affinities (AffinityNet, Ahn & Kwak, CVPR 2018).

Pairs live on a feature grid of ``h x w`` nodes: every pair of nodes closer than ``radius``
(Euclidean, strictly: ``dy**2 + dx**2 < radius**2``), each unordered pair once (a half-disk of
offsets), as in the original ``get_indices_of_pairs``. Affinities are given per pair, ``(N, E)``
in the order of :func:`pair_grid` ``(h, w, radius).src / .dst``.

The walk (paper eq. 10-11):

    A_ij = a_ij ** beta  for pairs within the radius (symmetric), A_ii = 1 (self loops)
    T = D^-1 A           (row-stochastic; D = diag of the row sums of A)
    vec(M*_c) = T^t vec(M_c)   for every channel c

Two ways to apply ``T^t``, chosen automatically by grid size (``mode="auto"``):

- ``dense``: the (N, P, P) matrix, ``t`` reached by repeated squaring (8 squarings for t = 256),
  like the original implementation; O(P^3 log t), fast for small grids (P = h * w).
- ``sparse``: a block-diagonal sparse ``T`` for the whole batch and ``t`` sparse-dense products;
  O(t * P * E / P); memory O(E), the only option for large grids.

Both give the same result up to float rounding (tested).
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

#: Grids up to this many nodes use the dense path under ``mode="auto"`` (CPU / CUDA). Measured
#: on one CPU thread, batch 8, 2 channels, t = 256: 12x12 dense 6 ms / sparse 15 ms, 16x16 both
#: 30 ms, 24x24 dense 300 ms / sparse 62 ms, 32x32 dense 1.7 s / sparse 0.11 s. The CUDA limit
#: is an estimate (P^3 log t flops are cheap on a GPU), not a measurement.
DENSE_MAX_NODES = {"cpu": 256, "cuda": 1600}
#: The CPU limit when torch uses more than one intra-op thread. Measured with
#: ``python -m benchmark perf --only random_walk`` on an idle 2-core machine, 2 threads, batch
#: 8, t = 256: 16x16 dense 12 ms / sparse 14 ms, 20x20 dense 44 ms / sparse 23 ms, 24x24 dense
#: 130 ms / sparse 33 ms, 32x32 dense 750 ms / sparse 66 ms: the crossover lies between 16x16
#: and 20x20, as with one thread. (An earlier reading of 576 came from a machine loaded to ~6
#: on 2 cores, where the sparse products suffered most.)
DENSE_MAX_NODES_MULTITHREAD_CPU = 256


def pair_offsets(radius: int = 5) -> list[tuple[int, int]]:
    """The half-disk of offsets ``(dy, dx)`` with ``0 < dy**2 + dx**2 < radius**2``.

    Each unordered pair of grid nodes is reached by exactly one offset (``dy > 0``, or
    ``dy == 0`` and ``dx > 0``). ``radius = 5`` gives 34 offsets, as in AffinityNet.

    Args:
        radius: the (exclusive) pair radius in grid cells, >= 1.

    Returns:
        The offsets, row-major.
    """
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    out = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dy * dy + dx * dx < radius * radius:
                out.append((dy, dx))
    return out


@dataclass(frozen=True)
class PairGrid:
    """All node pairs within a radius on an ``height x width`` grid.

    Attributes:
        height: grid rows.
        width: grid columns.
        radius: the exclusive pair radius.
        src: (E,) int64 flat index (``y * width + x``) of the first node of each pair.
        dst: (E,) int64 flat index of the second node (``src`` + one of :func:`pair_offsets`).
    """

    height: int
    width: int
    radius: int
    src: torch.Tensor
    dst: torch.Tensor

    @property
    def num_nodes(self) -> int:
        """``height * width``."""
        return self.height * self.width

    @property
    def num_pairs(self) -> int:
        """E, the number of unordered pairs."""
        return int(self.src.numel())

    def to(self, device: torch.device | str) -> PairGrid:
        """The same grid with its index tensors on ``device``."""
        return PairGrid(
            self.height, self.width, self.radius, self.src.to(device), self.dst.to(device)
        )


@functools.lru_cache(maxsize=32)
def _pair_grid_cpu(height: int, width: int, radius: int) -> PairGrid:
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    src, dst = [], []
    for dy, dx in pair_offsets(radius):
        valid = (ys + dy < height) & (xs + dx >= 0) & (xs + dx < width)
        y0, x0 = ys[valid], xs[valid]
        src.append(y0 * width + x0)
        dst.append((y0 + dy) * width + (x0 + dx))
    if src:
        s, d = torch.cat(src), torch.cat(dst)
    else:
        s = d = torch.zeros(0, dtype=torch.int64)
    return PairGrid(height, width, radius, s.long(), d.long())


def pair_grid(
    height: int, width: int, radius: int = 5, device: torch.device | str | None = None
) -> PairGrid:
    """All unordered node pairs closer than ``radius`` on a ``height x width`` grid (cached).

    Args:
        height: grid rows (>= 1).
        width: grid columns (>= 1).
        radius: exclusive pair radius in cells.
        device: where to put the index tensors (CPU by default).

    Returns:
        The :class:`PairGrid`.
    """
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1x1, got {height}x{width}")
    grid = _pair_grid_cpu(int(height), int(width), int(radius))
    return grid if device is None else grid.to(device)


def _check(affinity: torch.Tensor, grid: PairGrid) -> None:
    if affinity.dim() != 2 or affinity.shape[1] != grid.num_pairs:
        raise ValueError(
            f"affinity must have shape (N, {grid.num_pairs}) for a {grid.height}x{grid.width} "
            f"grid with radius {grid.radius}; got {tuple(affinity.shape)}"
        )


def affinity_matrix(affinity: torch.Tensor, grid: PairGrid, beta: float = 8.0) -> torch.Tensor:
    """The dense symmetric matrix ``A = a ** beta`` with self loops, (N, P, P).

    Args:
        affinity: (N, E) pair affinities in [0, 1], pairs ordered as ``grid.src / grid.dst``.
        grid: the pair grid.
        beta: the power that sharpens affinities (8 in AffinityNet).

    Returns:
        (N, P, P) float32, ``A[n, i, j] = A[n, j, i]``, ``A[n, i, i] = 1``.
    """
    _check(affinity, grid)
    grid = grid.to(affinity.device)
    n, p = affinity.shape[0], grid.num_nodes
    values = affinity.float().clamp(0.0, 1.0).pow(beta)  # (N, E)
    a = torch.zeros(n, p * p, dtype=torch.float32, device=affinity.device)
    a.index_copy_(1, grid.src * p + grid.dst, values)
    a = a.view(n, p, p)
    a = a + a.transpose(1, 2)
    a.diagonal(dim1=1, dim2=2).fill_(1.0)
    return a


def transition_matrix(affinity: torch.Tensor, grid: PairGrid, beta: float = 8.0) -> torch.Tensor:
    """The dense row-stochastic transition matrix ``T = D^-1 A``, (N, P, P)."""
    a = affinity_matrix(affinity, grid, beta)
    return a / a.sum(dim=2, keepdim=True)


def sparse_transition_matrix(
    affinity: torch.Tensor, grid: PairGrid, beta: float = 8.0
) -> torch.Tensor:
    """The block-diagonal sparse ``T = D^-1 A`` of a whole batch, (N*P, N*P) in CSR layout.

    Node ``i`` of image ``n`` is row ``n * P + i``.
    """
    _check(affinity, grid)
    dev = affinity.device
    grid = grid.to(dev)
    n, p = affinity.shape[0], grid.num_nodes
    values = affinity.float().clamp(0.0, 1.0).pow(beta)  # (N, E)
    base = (torch.arange(n, device=dev) * p).unsqueeze(1)  # (N, 1)
    src = (grid.src.unsqueeze(0) + base).reshape(-1)
    dst = (grid.dst.unsqueeze(0) + base).reshape(-1)
    diag = torch.arange(n * p, device=dev)
    rows = torch.cat([src, dst, diag])
    cols = torch.cat([dst, src, diag])
    vals = torch.cat([values.reshape(-1), values.reshape(-1), torch.ones(n * p, device=dev)])
    degree = torch.zeros(n * p, device=dev).index_add_(0, rows, vals)
    vals = vals / degree[rows]
    t = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), vals, (n * p, n * p), check_invariants=False
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return t.coalesce().to_sparse_csr()


def matrix_power(t: torch.Tensor, steps: int) -> torch.Tensor:
    """``t ** steps`` for a batch of square matrices by repeated squaring (binary powering)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    result: torch.Tensor | None = None
    base = t
    while steps:
        if steps & 1:
            result = base if result is None else torch.bmm(result, base)
        steps >>= 1
        if steps:
            base = torch.bmm(base, base)
    if result is None:
        eye = torch.eye(t.shape[-1], dtype=t.dtype, device=t.device)
        return eye.expand_as(t).clone()
    return result


def auto_walk_mode(num_nodes: int, device_type: str = "cpu") -> str:
    """The mode ``random_walk(mode="auto")`` uses for a grid of ``num_nodes`` nodes.

    Args:
        num_nodes: ``h * w`` of the walk's grid.
        device_type: ``cpu`` or ``cuda`` (others use the CPU rule).

    Returns:
        ``dense`` up to :data:`DENSE_MAX_NODES` nodes for the device type (on a CPU with more
        than one torch thread, :data:`DENSE_MAX_NODES_MULTITHREAD_CPU`), else ``sparse``.
    """
    limit = DENSE_MAX_NODES.get(device_type, DENSE_MAX_NODES["cpu"])
    if device_type not in DENSE_MAX_NODES or device_type == "cpu":
        if torch.get_num_threads() > 1:
            limit = DENSE_MAX_NODES_MULTITHREAD_CPU
    return "dense" if num_nodes <= limit else "sparse"


def random_walk(
    maps: torch.Tensor,
    affinity: torch.Tensor,
    beta: float = 8.0,
    t: int = 256,
    radius: int = 5,
    mode: str = "auto",
) -> torch.Tensor:
    """Propagate maps with the affinity random walk: ``vec(M*_c) = T^t vec(M_c)``.

    Args:
        maps: (N, C, h, w) maps on the affinity grid (e.g. CAMs with a background channel).
        affinity: (N, E) pair affinities in [0, 1] for ``pair_grid(h, w, radius)``.
        beta: power applied to affinities (8 in AffinityNet).
        t: number of walk steps (256 = 2 ** 8 in AffinityNet).
        radius: exclusive pair radius in grid cells (5 in AffinityNet).
        mode: ``dense`` (repeated squaring), ``sparse`` (t sparse products) or ``auto``
            (dense up to :data:`DENSE_MAX_NODES` nodes for the device type).

    Returns:
        (N, C, h, w) float32 propagated maps; each value is a convex combination of the input
        values, so maps in [0, 1] stay in [0, 1].
    """
    if maps.dim() != 4:
        raise ValueError(f"maps must be (N, C, h, w), got shape {tuple(maps.shape)}")
    n, c, h, w = maps.shape
    grid = pair_grid(h, w, radius)
    _check(affinity, grid)
    if affinity.shape[0] != n:
        raise ValueError(f"affinity has {affinity.shape[0]} images, maps have {n}")
    if mode == "auto":
        mode = auto_walk_mode(h * w, maps.device.type)
    x = maps.float().reshape(n, c, h * w)
    with torch.autocast(maps.device.type, enabled=False):
        if mode == "dense":
            trans = transition_matrix(affinity, grid, beta)  # (N, P, P)
            out = torch.bmm(matrix_power(trans, t), x.transpose(1, 2))  # (N, P, C)
            out = out.transpose(1, 2)
        elif mode == "sparse":
            trans = sparse_transition_matrix(affinity, grid, beta)  # (N*P, N*P)
            v = x.transpose(1, 2).reshape(n * h * w, c)  # (N*P, C)
            for _ in range(t):
                v = trans @ v
            out = v.reshape(n, h * w, c).transpose(1, 2)
        else:
            raise ValueError(f"unknown random walk mode {mode!r}; valid: auto, dense, sparse")
    return out.reshape(n, c, h, w).contiguous()
