"""Semantic tokens: adaptive pooling values, token layout, anchors, and the whole extractor against
transformers' SiglipVisionModel + torch AdaptiveAvgPool2d."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from model_helpers import tiny_hf_siglip_config
from transformers import SiglipVisionModel

from convert_wan_weights import cli
from sama_jax import presets, semantic
from sama_jax.models import load_siglip
from sama_jax.models.siglip import preprocess


def test_pool_4x4_to_2x2_by_hand():
    grid = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    #  0  1 |  2  3
    #  4  5 |  6  7      top-left (0+1+4+5)/4 = 2.5, top-right 4.5,
    #  8  9 | 10 11      bottom-left 10.5, bottom-right 12.5
    # 12 13 | 14 15
    pooled = np.asarray(semantic.adaptive_avg_pool(jnp.asarray(grid), 2))
    np.testing.assert_array_equal(pooled[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])


def test_pool_matches_torch_adaptive_avg_pool_27_to_8(rng):
    # 27 is not a multiple of 8: PyTorch's bins overlap (sizes 4 and 5); ours must be the same bins.
    grid = rng.standard_normal((2, 27, 27, 5)).astype(np.float32)
    ours = np.asarray(semantic.adaptive_avg_pool(jnp.asarray(grid), 8))
    expected = torch.nn.AdaptiveAvgPool2d(8)(torch.from_numpy(grid).permute(0, 3, 1, 2))
    np.testing.assert_allclose(ours, expected.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)
    assert semantic.adaptive_pool_matrix(27, 8)[0].nonzero()[0].tolist() == [0, 1, 2, 3]
    assert semantic.adaptive_pool_matrix(27, 8)[1].nonzero()[0].tolist() == [3, 4, 5, 6]


def test_token_layout_per_frame_local_then_global():
    # 2 frames of a 4x4 grid with 3 channels; frame f, patch p, channel c = 100 f + p + 1000 c.
    f, p, c = np.meshgrid(np.arange(2), np.arange(16), np.arange(3), indexing="ij")
    features = jnp.asarray((100 * f + p + 1000 * c)[None].astype(np.float32))
    tokens = np.asarray(semantic.tokens_from_features(features, semantic.SemanticConfig(2, 2, "mean")))
    assert tokens.shape == (1, 2 * 5, 3)
    local = np.array([2.5, 4.5, 10.5, 12.5])
    np.testing.assert_allclose(tokens[0, :, 0], np.concatenate([local, [7.5], local + 100, [107.5]]))
    np.testing.assert_allclose(tokens[0, :, 2] - tokens[0, :, 0], 2000)
    maxed = np.asarray(semantic.tokens_from_features(features, semantic.SemanticConfig(2, 2, "max")))
    assert maxed[0, 4, 0] == 15 and maxed[0, 9, 0] == 115
    bare = semantic.tokens_from_features(features, semantic.SemanticConfig(2, 2, "none"))
    assert bare.shape == (1, 8, 3)
    assert semantic.SemanticConfig(**presets.SEMANTIC["wan_14b"]).num_tokens == 65


def test_anchor_frames_and_config_errors():
    assert semantic.anchor_frame_indices(81, 1).tolist() == [0]
    assert semantic.anchor_frame_indices(81, 4).tolist() == [0, 27, 53, 80]
    assert semantic.anchor_frame_indices(1, 2).tolist() == [0, 0]
    with pytest.raises(ValueError, match="global_token"):
        semantic.SemanticConfig(global_token="cls")


def test_extractor_matches_transformers_siglip_and_torch_pooling(tmp_path):
    tiny = presets.SIGLIP["tiny"]
    reference = SiglipVisionModel(tiny_hf_siglip_config()).eval()
    reference.save_pretrained(tmp_path / "hf")
    assert (
        cli.main([str(tmp_path / "hf"), str(tmp_path / "ours"), "--kind", "siglip", "--dtype", "float32"])
        == 0
    )
    model = load_siglip(str(tmp_path / "ours"))
    cfg = semantic.SemanticConfig(num_anchor_frames=2, pool_grid=3, global_token="mean")
    video = np.random.default_rng(0).integers(0, 256, (2, 5, 40, 64, 3)).astype(np.uint8)
    tokens = np.asarray(semantic.semantic_tokens(model, video, cfg))
    assert tokens.shape == (2, 2 * 10, tiny["hidden_size"])

    frames = video[:, [0, 4]].reshape(4, 40, 64, 3)
    pixels = torch.from_numpy(np.array(preprocess(frames, tiny["image_size"]))).permute(0, 3, 1, 2)
    with torch.no_grad():
        features = reference(pixel_values=pixels).last_hidden_state  # (4, 16, C)
    grid = features.reshape(4, 4, 4, -1).permute(0, 3, 1, 2)
    local = torch.nn.AdaptiveAvgPool2d(3)(grid).flatten(2).transpose(1, 2)  # (4, 9, C)
    expected = torch.cat([local, features.mean(1, keepdim=True)], 1).reshape(2, 20, -1).numpy()
    err = np.abs(tokens - expected).max() / np.abs(expected).max()
    assert err < 1e-5, err
    from_anchors = semantic.semantic_tokens_from_anchors(model, video[:, [0, 4]], cfg)
    np.testing.assert_array_equal(np.asarray(from_anchors), tokens)
    with pytest.raises(ValueError, match="got 1 anchor frames"):
        semantic.semantic_tokens_from_anchors(model, video[:, :1], cfg)
