"""Motion-alignment pretext transforms: exact behaviour on small arrays, mixing, per-sample seeding."""

import numpy as np
import pytest

from sama_jax.data import pretext


def unique_clip(t, h, w):
    """Every voxel's first channel encodes its own index, so any movement is visible."""
    values = np.arange(t * h * w, dtype=np.int64).reshape(t, h, w)
    clip = np.stack([values % 251 + 1, (values // 251) % 251 + 1, values % 7 + 1], -1)
    return clip.astype(np.uint8)


def test_speed_indices_released_formula():
    # n = 9, s = 2: t/8*2 -> 0, 2, 4, 6, then frozen on the last frame.
    np.testing.assert_array_equal(pretext.speed_indices(9, 2.0), [0, 2, 4, 6, 8, 8, 8, 8, 8])
    # s = 0.5 over n = 5: 0, 0.5, 1, 1.5, 2 with Python's half-to-even rounding -> 0, 0, 1, 2, 2.
    np.testing.assert_array_equal(pretext.speed_indices(5, 0.5), [0, 0, 1, 2, 2])
    idx = pretext.speed_indices(49, 2.0)
    assert len(idx) == 49 and idx[12] == 24 and (idx[24:] == 48).all()
    np.testing.assert_array_equal(pretext.speed_indices(1, 2.0), [0])


def test_split_sizes():
    assert pretext.split_sizes(49, 4) == [13, 12, 12, 12]
    assert pretext.split_sizes(5, 2) == [3, 2]
    assert pretext.split_sizes(8, 2) == [4, 4]
    with pytest.raises(ValueError):
        pretext.split_sizes(3, 4)


@pytest.mark.parametrize(
    "shape, grid", [((8, 6, 10), (2, 2, 2)), ((5, 7, 9), (2, 2, 2)), ((17, 8, 12), (4, 4, 4))]
)
def test_tube_shuffle_is_an_invertible_block_permutation(shape, grid):
    clip = unique_clip(*shape)
    shuffled, perm = pretext.tube_shuffle(clip, grid, np.random.default_rng(3))
    n_blocks = int(np.prod(grid))
    assert sorted(perm.tolist()) == list(range(n_blocks))
    # (5, 7, 9) in 2x2x2 gives 8 blocks of 8 different shapes: nothing may move (released rule).
    movable = shape != (5, 7, 9)
    assert (perm != np.arange(n_blocks)).any() == movable
    # Same multiset of pixels, moved as whole blocks between blocks of equal shape.
    blocks = pretext._blocks(shape, grid)
    for i, j in enumerate(perm):
        src, dst = blocks[j], blocks[i]
        assert [s.stop - s.start for s in src] == [s.stop - s.start for s in dst]
        np.testing.assert_array_equal(shuffled[dst], clip[src])
    np.testing.assert_array_equal(pretext.tube_unshuffle(shuffled, perm, grid), clip)


def test_tube_shuffle_moves_blocks_only_within_equal_shape_groups():
    # t sizes [3, 2] with even h, w: two groups of 4 blocks; a block of the 3-frame chunk never
    # lands in the 2-frame chunk.
    clip = unique_clip(5, 4, 4)
    for seed in range(20):
        _, perm = pretext.tube_shuffle(clip, (2, 2, 2), np.random.default_rng(seed))
        assert set(perm[:4].tolist()) == {0, 1, 2, 3} and set(perm[4:].tolist()) == {4, 5, 6, 7}


def test_cube_mask_full_frame_released_variant():
    clip = np.full((49, 4, 4, 3), 200, np.uint8)
    starts = set()
    for seed in range(300):
        masked, mask = pretext.cube_mask(clip, 0.3, "full_frame", np.random.default_rng(seed))
        frames = np.flatnonzero(mask.any(axis=(1, 2)))
        assert len(frames) == 15 and (np.diff(frames) == 1).all()  # round(0.3*49) contiguous
        assert mask[frames].all() and frames[0] >= 1  # whole frames, never frame 0
        assert (masked[mask] == 0).all() and (masked[~mask] == 200).all()
        starts.add(int(frames[0]))
    assert min(starts) == 1 and max(starts) == 34  # uniform in [1, n-k]


@pytest.mark.parametrize("shape", [(17, 32, 48), (5, 16, 16), (49, 24, 40)])
def test_cube_mask_spatial_ratio_and_contiguity(shape):
    clip = np.full(shape + (3,), 90, np.uint8)
    for seed in range(20):
        masked, mask = pretext.cube_mask(clip, 0.3, "spatial", np.random.default_rng(seed))
        assert abs(mask.mean() - 0.3) < 0.04
        ts, hs, ws = (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
        box = mask[ts[0] : ts[-1] + 1, hs[0] : hs[-1] + 1, ws[0] : ws[-1] + 1]
        assert box.all() and box.sum() == mask.sum()  # one solid cube
        assert ts[0] >= 1  # frame 0 stays visible
        assert (masked[mask] == 0).all() and (masked[~mask] == 90).all()


def test_cube_mask_needs_a_video():
    with pytest.raises(ValueError, match="frame 0"):
        pretext.cube_mask(np.zeros((1, 4, 4, 3), np.uint8), 0.3, "full_frame", np.random.default_rng(0))


def test_task_mix_follows_weights():
    rng = np.random.default_rng(0)
    draws = [pretext.choose_task(rng, dict(none=1, cube=2, speed=3, shuffle=4)) for _ in range(20000)]
    freq = {t: draws.count(t) / len(draws) for t in pretext.TASKS}
    for task, expected in zip(pretext.TASKS, (0.1, 0.2, 0.3, 0.4)):
        assert abs(freq[task] - expected) < 0.015, freq
    only = {pretext.choose_task(rng, dict(none=0, cube=0, speed=1, shuffle=0)) for _ in range(50)}
    assert only == {"speed"}


def run_task(task, clip, index=0, **overrides):
    cfg = pretext.PretextConfig(weights={task: 1.0}, **overrides)
    return pretext.apply_pretext(clip, "A ball rolls.", cfg, np.random.default_rng([0, index]), index)


def test_apply_pretext_source_only_target_untouched_token_prepended():
    clip = unique_clip(9, 8, 8)
    keep = clip.copy()
    for task, token in (
        ("cube", "[cube inpainting]"),
        ("speed", "[speed perturbation]"),
        ("shuffle", "[tube shuffle]"),
    ):
        out = run_task(task, clip)
        np.testing.assert_array_equal(clip, keep)
        assert out.task == task and out.text == token + " A ball rolls."
        assert out.source.shape == clip.shape and out.source.dtype == np.uint8
        assert not np.array_equal(out.source, clip)
    np.testing.assert_array_equal(run_task("speed", clip).source, clip[[0, 2, 4, 6, 8, 8, 8, 8, 8]])
    out = run_task("shuffle", clip)
    np.testing.assert_array_equal(pretext.tube_unshuffle(out.source, out.info["perm"], (2, 2, 2)), clip)


def test_apply_pretext_none_variants_and_custom_tokens():
    clip = unique_clip(5, 4, 4)
    out = run_task("none", clip)
    assert out.text == "A ball rolls." and (out.source == 0).all()
    out = run_task("none", clip, none_source="copy", tokens=dict(none="[copy]"))
    assert out.text == "[copy] A ball rolls."
    np.testing.assert_array_equal(out.source, clip)


def test_alternate_speed_mode_uses_sample_index_parity():
    clip = unique_clip(9, 4, 4)
    assert run_task("speed", clip, index=4, speed_mode="alternate").info["speed"] == 2.0
    odd = run_task("speed", clip, index=7, speed_mode="alternate")
    assert odd.info["speed"] == 0.5
    np.testing.assert_array_equal(odd.info["indices"], pretext.speed_indices(9, 0.5))
    assert run_task("speed", clip, index=7).info["speed"] == 2.0  # fixed mode


def test_reproducible_from_seed_and_index():
    clip = unique_clip(9, 8, 8)
    cfg = pretext.PretextConfig()

    def make(seed, index):
        return pretext.apply_pretext(clip, "x", cfg, np.random.default_rng([seed, index]), index)

    a, b = make(0, 11), make(0, 11)
    assert a.task == b.task and a.text == b.text
    np.testing.assert_array_equal(a.source, b.source)
    tasks = {make(0, i).task for i in range(40)}
    assert tasks == set(pretext.TASKS)
    sources = [make(s, 11).source for s in range(6)]
    assert any(not np.array_equal(sources[0], s) for s in sources[1:])


def test_config_validation_and_from_config():
    cfg = pretext.PretextConfig.from_config(
        dict(cube_mode="full_frame", shuffle_grid=[4, 4, 4], tokens=dict(cube="<cube>"))
    )
    assert cfg.shuffle_grid == (4, 4, 4) and cfg.tokens["cube"] == "<cube>"
    assert cfg.tokens["speed"] == "[speed perturbation]"
    with pytest.raises(ValueError, match="unknown pretext config fields"):
        pretext.PretextConfig.from_config(dict(mask_ratio=0.3))
    with pytest.raises(ValueError, match="cube_mode"):
        pretext.PretextConfig(cube_mode="random")
    with pytest.raises(ValueError, match="weights"):
        pretext.PretextConfig(weights=dict(blur=1.0))
    with pytest.raises(ValueError, match="cube_mask_ratio"):
        pretext.PretextConfig(cube_mask_ratio=1.5)
