from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.base import Context, ImageSet, create_method
from methods.cam_affinitynet import (
    IGNORE,
    affinity_labels,
    affinity_loss,
    confident_labels,
    downsample_labels,
    pair_affinities,
    psa_confident_labels,
    random_resized_crop,
)
from methods.common.random_walk import pair_grid


def test_confident_labels_thresholds():
    cam = np.array([[0.9, 0.30, 0.2999], [0.05, 0.0499, 0.0]], dtype=np.float32)
    got = confident_labels(cam, fg_threshold=0.30, bg_threshold=0.05)
    # fg where M >= 0.30, bg where M < 0.05, everything between ignored
    expected = np.array([[1, 1, IGNORE], [IGNORE, 0, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.uint8
    with pytest.raises(ValueError, match="needs the uint8 image"):
        confident_labels(cam, crf=True)
    with pytest.raises(ValueError, match="bg_threshold"):
        confident_labels(cam, fg_threshold=0.1, bg_threshold=0.2)


def test_confident_labels_crf_cleans_a_clean_image():
    # left half red, right half blue; the CAM covers the red half with a noisy hole
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = (220, 30, 30)
    img[:, 16:] = (30, 30, 220)
    cam = np.zeros((32, 32), np.float32)
    cam[:, :16] = 0.8
    cam[10:13, 5:8] = 0.0  # a hole in the fg seed, inside the red region
    plain = confident_labels(cam)
    assert (plain[10:13, 5:8] == 0).all()
    cleaned = confident_labels(cam, image=img, crf=True)
    assert (cleaned[10:13, 5:8] == 1).all()  # the CRF fills the hole from the colours
    assert (cleaned[:, 20:] == 0).all()


def test_downsample_labels_takes_cell_centres():
    labels = torch.full((1, 16, 16), 7, dtype=torch.uint8)
    labels[0, 4, 4] = 1  # centre pixel of cell (0, 0) for an 8x downsampling
    labels[0, 0, 8] = 2  # a corner pixel of cell (0, 1): not sampled
    got = downsample_labels(labels, (2, 2))
    assert got.dtype == torch.uint8
    assert got.tolist() == [[[1, 7], [7, 7]]]


def test_affinity_labels_pair_counts_by_hand():
    # grid 2x3, radius 2 = the 8-neighbourhood (offsets (0,1), (1,-1), (1,0), (1,1)):
    #   1   1  0
    #  255  0  0
    labels = torch.tensor([[[1, 1, 0], [IGNORE, 0, 0]]], dtype=torch.uint8)
    grid = pair_grid(2, 3, radius=2)
    assert grid.num_pairs == 11  # 4 horizontal + 3 vertical + 4 diagonal
    pos_bg, pos_fg, neg = affinity_labels(labels, grid)
    pairs = {
        name: {
            tuple(sorted((int(grid.src[e]), int(grid.dst[e])))) for e in torch.nonzero(m[0])[:, 0]
        }
        for name, m in (("bg", pos_bg), ("fg", pos_fg), ("neg", neg))
    }
    # flat indices: 0 1 2 / 3 4 5
    assert pairs["fg"] == {(0, 1)}
    assert pairs["bg"] == {(2, 4), (2, 5), (4, 5)}
    assert pairs["neg"] == {(0, 4), (1, 2), (1, 4), (1, 5)}
    # the 3 pairs touching the ignored node 3 are in no set
    assert int(pos_bg.sum() + pos_fg.sum() + neg.sum()) == 11 - 3
    assert not (pos_bg & neg).any() and not (pos_fg & neg).any() and not (pos_bg & pos_fg).any()


def test_affinity_labels_match_brute_force_radius5():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 7, 9), generator=gen)
    labels[labels == 2] = IGNORE
    grid = pair_grid(7, 9, radius=5)
    pos_bg, pos_fg, neg = affinity_labels(labels, grid)
    for n in range(2):
        flat = labels[n].reshape(-1).tolist()
        counts = {"bg": 0, "fg": 0, "neg": 0}
        for i in range(63):
            for j in range(i + 1, 63):
                (yi, xi), (yj, xj) = divmod(i, 9), divmod(j, 9)
                if (yi - yj) ** 2 + (xi - xj) ** 2 >= 25 or IGNORE in (flat[i], flat[j]):
                    continue
                key = "neg" if flat[i] != flat[j] else ("bg" if flat[i] == 0 else "fg")
                counts[key] += 1
        assert counts == {
            "bg": int(pos_bg[n].sum()),
            "fg": int(pos_fg[n].sum()),
            "neg": int(neg[n].sum()),
        }


def test_pair_affinities_formula():
    grid = pair_grid(2, 2, radius=2)
    e = torch.zeros(1, 3, 2, 2)
    e[0, :, 1, 1] = torch.tensor([0.3, 0.6, 0.9])  # node 3 differs; mean |diff| = 0.6
    a = pair_affinities(e, grid)[0]
    for k in range(grid.num_pairs):
        i, j = int(grid.src[k]), int(grid.dst[k])
        expected = math.exp(-0.6) if 3 in (i, j) else 1.0
        assert a[k].item() == pytest.approx(expected, rel=1e-6)


def test_loss_zero_on_perfect_affinities_and_weighted_parts():
    pos_bg = torch.tensor([[True, True, False, False, False, False]])
    pos_fg = torch.tensor([[False, False, True, True, False, False]])
    neg = torch.tensor([[False, False, False, False, True, True]])
    perfect = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    loss, _ = affinity_loss(perfect, pos_bg, pos_fg, neg)
    assert abs(loss.item()) < 1e-4
    wrong = 1.0 - perfect
    loss, parts = affinity_loss(wrong, pos_bg, pos_fg, neg)
    assert loss.item() > 10  # -log(1e-5) = 11.5 on every pair
    # only fg pairs at 0.5: loss = 1/4 * log 2 (bg and neg perfect)
    half_fg = torch.tensor([[1.0, 1.0, 0.5, 0.5, 0.0, 0.0]])
    loss, parts = affinity_loss(half_fg, pos_bg, pos_fg, neg)
    assert loss.item() == pytest.approx(math.log(2) / 4, abs=1e-4)
    assert parts["fg"] == pytest.approx(math.log(2), abs=1e-4)
    # only neg pairs at 0.5: loss = 1/2 * log 2
    half_neg = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5, 0.5]])
    loss, _ = affinity_loss(half_neg, pos_bg, pos_fg, neg)
    assert loss.item() == pytest.approx(math.log(2) / 2, abs=1e-4)


def test_random_resized_crop_keeps_image_and_labels_aligned():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4).contiguous()
    labels = torch.arange(16).view(1, 4, 4).to(torch.uint8)
    gen = torch.Generator().manual_seed(0)
    xc, lc = random_resized_crop(x, labels, 0.5, gen)
    assert xc.shape == x.shape and lc.shape == labels.shape and lc.dtype == torch.uint8
    # labels come from the same box as the image: every label value lies in the box
    assert set(lc.unique().tolist()) <= set(range(16))
    assert xc.min() >= lc.min().float() - 4 and xc.max() <= lc.max().float() + 4
    same_x, same_l = random_resized_crop(x, labels, 1.0, gen)
    assert torch.equal(same_x, x) and torch.equal(same_l, labels)


def test_walk_spreads_seed_inside_region_only():
    method = create_method("cam_affinitynet", preset="tiny")
    h = w = 8
    grid = pair_grid(h, w, method.config.radius)
    left = (grid.src % w < 4) == (grid.dst % w < 4)
    aff = torch.where(left, 1.0, 0.0).unsqueeze(0)  # a wall between columns 3 and 4
    maps = torch.zeros(1, 1, 64, 64)
    maps[0, 0, 8:16, 0:8] = 1.0  # the CAM lights one 8x8 cell of the left half
    out = method.walk(maps, aff, grid)[0, 0]
    assert out.shape == (64, 64)
    assert out[:, 36:].max() < 1e-4  # nothing crosses the wall
    assert out[56:, 24:28].min() > 0.0  # the far end of the left half was reached
    assert out[:, :28].min() > 0.5 * out[:, :28].max()  # the seed spread over its region


class _Recording(Context):
    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__(seed=0)
        self.stages: list[str] = []
        self.calls = 0
        self.stop_after = stop_after

    def stage(self, name, compute):
        self.stages.append(name)
        return compute()

    def should_continue(self) -> bool:
        self.calls += 1
        return self.stop_after is None or self.calls <= self.stop_after


@pytest.fixture(scope="module")
def fitted(tiny_dataset, tiny_cache):
    from methods.base import ImageSet

    train = ImageSet(
        images=np.asarray(tiny_cache.images),
        labels=np.asarray(tiny_cache.labels),
        num_classes=tiny_dataset.num_classes,
        names=list(tiny_cache.names),
    )
    method = create_method("cam_affinitynet", preset="tiny")
    ctx = _Recording()
    method.fit(train, ctx)
    return method, ctx, train


def test_tiny_fit_localize_refine(fitted):
    method, ctx, train = fitted
    assert ctx.stages == ["classifier", "affinity"]
    batch = train.subset(slice(0, 5))
    maps = method.localize(batch, ctx)
    assert maps.shape == (5, 1, 64, 64) and maps.dtype == np.float32
    refined = method.refine(batch, maps, ctx)
    assert refined.shape == (5, 1, 64, 64) and refined.dtype == np.float32
    assert np.isfinite(refined).all() and refined.min() >= 0 and refined.max() <= 1
    assert not np.allclose(refined, maps)  # the walk changed the maps
    # maps given at another resolution are resized to the images first
    small = torch.nn.functional.interpolate(torch.from_numpy(maps), size=(32, 32)).numpy()
    assert method.refine(batch, small, ctx).shape == (5, 1, 64, 64)
    with pytest.raises(ValueError, match="maps must be"):
        method.refine(batch, maps[:3], ctx)


def test_localize_of_seeded_train_images_reuses_the_seed_cams(fitted, monkeypatch):
    """The train CAMs computed for the seeds are the maps localize returns: no second pass."""
    method, ctx, train = fitted
    batch = train.subset(slice(3, 9))
    direct = method.cam.localize(batch, ctx)
    calls = []
    monkeypatch.setattr(method.cam, "localize", lambda *a: calls.append(a) or direct)
    memo = method.localize(batch, ctx)
    assert not calls and memo.shape == direct.shape
    np.testing.assert_allclose(memo, direct, atol=1e-5)
    other = train.subset(slice(0, 2))
    other.names = ["not-seeded", other.names[1]]
    method.localize(other, ctx)
    assert len(calls) == 1  # an image without seed CAMs goes through the classifier


def test_budget_stops_both_stages(tiny_imageset):
    method = create_method("cam_affinitynet", preset="tiny")
    ctx = _Recording(stop_after=1)
    method.fit(tiny_imageset, ctx)
    # classifier: one step, then False; affinity: False at once -> 3 calls in all
    assert ctx.calls == 3
    maps = method.localize(tiny_imageset.subset(slice(0, 2)), ctx)
    assert method.refine(tiny_imageset.subset(slice(0, 2)), maps, ctx).shape == (2, 1, 64, 64)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="output"):
        create_method("cam_affinitynet[output=argmax]", preset="tiny")
    with pytest.raises(ValueError, match="aff_optimizer"):
        create_method("cam_affinitynet[aff_optimizer=rmsprop]", preset="tiny")
    with pytest.raises(RuntimeError, match="before fit"):
        create_method("cam_affinitynet", preset="tiny").localize(None, Context())


# ---- the multi-label form (issue 17) ------------------------------------------------------------
def test_multiclass_confident_labels_take_the_argmax_class_of_the_tagged_ones():
    cams = np.zeros((3, 2, 3), dtype=np.float32)
    cams[0] = [[0.9, 0.2, 0.01], [0.0, 0.6, 0.02]]
    cams[1] = [[0.4, 0.1, 0.03], [0.0, 0.7, 0.04]]
    cams[2] = 0.95  # an untagged class: never a label, even where its map is the largest
    got = confident_labels(cams, fg_threshold=0.30, bg_threshold=0.05, classes=[0, 1])
    expected = np.array([[1, IGNORE, 0], [0, 2, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(got, expected)
    # one class given as (1, H, W) is exactly the binary rule on (H, W)
    np.testing.assert_array_equal(
        confident_labels(cams[:1], 0.30, 0.05), confident_labels(cams[0], 0.30, 0.05)
    )
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    crf = confident_labels(cams, 0.30, 0.05, image=image, crf=True, classes=[0, 1])
    assert set(np.unique(crf)) <= {0, 1, 2, IGNORE}


def test_psa_seeds_from_low_and_high_alpha_backgrounds():
    # max CAM m: fg (class) where m > (1 - m) ** 4; bg where (1 - m) ** 32 >= m; else ignore
    m = np.array([[0.9, 0.3, 0.2], [0.1, 0.01, 0.0]], dtype=np.float32)
    cams = np.stack([m, m * 0.5])  # class 0 always wins
    got = psa_confident_labels(cams, low_alpha=4, high_alpha=32)
    expected = np.array([[1, 1, IGNORE], [IGNORE, 0, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(got, expected)
    swapped = psa_confident_labels(cams[::-1].copy(), 4, 32, classes=[1])
    np.testing.assert_array_equal(swapped, np.where(expected == 1, 2, expected))
    with pytest.raises(ValueError, match="low_alpha"):
        psa_confident_labels(cams, low_alpha=32, high_alpha=4)


def test_walk_background_channel_is_one_minus_max_class_power_alpha():
    """No affinities (T = I): the ratio output is M_c / (M_c + (1 - max_c M_c) ** alpha)."""
    method = create_method("cam_affinitynet[output=ratio]", preset="tiny")
    rng = np.random.default_rng(1)
    maps = torch.from_numpy(rng.uniform(0, 1, size=(2, 3, 4, 4)).astype(np.float32))
    maps[:, 2] = 0.0  # an untagged class
    grid = pair_grid(4, 4, method.config.radius)
    aff = torch.zeros(2, grid.num_pairs)
    got = method.walk(maps, aff, grid)
    bg = (1 - maps.amax(dim=1, keepdim=True)) ** method.config.bg_alpha
    expected = maps / (maps + bg + 1e-5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert torch.all(got[:, 2] == 0)


def test_multilabel_fit_seeds_and_walk_only_tagged_classes():
    rng = np.random.default_rng(0)
    n, c, s = 8, 4, 32
    tags = np.zeros((n, c), dtype=np.uint8)
    for i in range(n):
        tags[i, rng.choice(c, size=1 + i % 2, replace=False)] = 1
    data = ImageSet(
        images=rng.integers(0, 255, size=(n, s, s, 3), dtype=np.uint8),
        labels=tags,
        num_classes=c,
        names=[f"im{i}" for i in range(n)],
    )
    method = create_method("cam_affinitynet[seed_rule=psa]", preset="tiny")
    ctx = Context(max_epochs=1)
    method.fit(data, ctx)
    seeds = method.seed_labels(data, ctx)
    for i in range(n):
        allowed = {0, IGNORE, *(np.flatnonzero(tags[i]) + 1)}
        assert set(np.unique(seeds[i])) <= allowed
    maps = method.refine(data, method.localize(data, ctx), ctx)
    assert maps.shape == (n, c, s, s)
    untagged = np.broadcast_to(tags[:, :, None, None] == 0, maps.shape)
    assert np.all(maps[untagged] == 0) and np.all((maps >= 0) & (maps <= 1))
