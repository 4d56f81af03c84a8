"""Wan2.1 VAE (sama_jax.models.wan_vae) against diffusers' AutoencoderKLWan, fp32 on CPU.

The reference is a tiny random AutoencoderKLWan (base_dim 8, num_res_blocks 2) saved with
save_pretrained and converted by our converter. Errors are max|ours - ref| / max|ref|.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from flax import nnx

from convert_wan_weights import cli
from sama_jax import sharding
from sama_jax.models import wan_vae

MEAN = torch.tensor(wan_vae.LATENTS_MEAN).view(1, 16, 1, 1, 1)
STD = torch.tensor(wan_vae.LATENTS_STD).view(1, 16, 1, 1, 1)
SHAPES = [(1, 1, 16, 16), (1, 5, 16, 24), (2, 9, 24, 16)]  # (B, T, H, W)


def rel_err(a, b, label: str = "") -> float:
    """max|a - b| / max|b|; printed with `label` (pytest -s shows the measured errors)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.abs(a - b).max() / np.abs(b).max())
    if label:
        print(f"{label}: max|ours - ref| / max|ref| = {err:.2e}")
    return err


def to_torch(x):  # channels-last (B, T, H, W, C) -> (B, C, T, H, W)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def to_ours(x):
    return np.moveaxis(x.numpy(), 1, -1)


@pytest.fixture(scope="module")
def torch_vae():
    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8, z_dim=16, num_res_blocks=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # default ones would hide a wrong norm mapping
                p.mul_(1 + 0.2 * torch.randn_like(p))
        # Keep decoded values mostly inside [-1, 1], so the clamp does not hide differences.
        model.decoder.conv_out.weight.mul_(0.2)
    return model


@pytest.fixture(scope="module")
def vae_path(torch_vae, tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_vae")
    torch_vae.save_pretrained(str(root / "diffusers"))
    assert cli.main([str(root / "diffusers"), str(root / "ours"), "--kind", "vae", "--dtype", "float32"]) == 0
    return str(root / "ours")


@pytest.fixture(scope="module")
def vae(vae_path):
    return wan_vae.load_vae(vae_path)


def random_video(shape, seed=0):
    b, t, h, w = shape
    return np.random.default_rng(seed).uniform(-1, 1, (b, t, h, w, 3)).astype(np.float32)


def random_latents(shape, seed=1):
    b, t, h, w = shape
    return (
        np.random.default_rng(seed)
        .standard_normal((b, 1 + (t - 1) // 4, h // 8, w // 8, 16))
        .astype(np.float32)
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_encode_matches_diffusers(vae, torch_vae, shape):
    video = random_video(shape)
    with torch.no_grad():
        mu = torch_vae.encode(to_torch(video)).latent_dist.mode()
    ref = to_ours((mu - MEAN) / STD)
    ours = wan_vae.encode_video(vae, video)
    assert ours.shape == (shape[0], 1 + (shape[1] - 1) // 4, shape[2] // 8, shape[3] // 8, 16)
    assert rel_err(ours, ref, f"encode {shape} vs diffusers") < 2e-6


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_matches_diffusers(vae, torch_vae, shape):
    latents = random_latents(shape)
    with torch.no_grad():
        ref = to_ours(torch_vae.decode(to_torch(latents) * STD + MEAN).sample)
    assert np.mean(np.abs(ref) >= 1) < 0.05  # the comparison is not dominated by the clamp
    ours = wan_vae.decode_latents(vae, latents)
    assert ours.shape == shape + (3,)
    assert rel_err(ours, ref, f"decode {shape} vs diffusers") < 1e-5


def test_bfloat16_error_like_diffusers_bfloat16(vae_path, torch_vae, tmp_path):
    """The official pipeline runs the VAE in bf16. Our bf16 checkpoint run in bf16 is as close to
    the fp32 reference as diffusers run in bf16 is, within 2x (measured: encode 4.0e-3 vs
    diffusers 3.0e-3, decode 6.0e-2 vs 6.0e-2, max|err| / max|ref|)."""
    diffusers_dir = vae_path.rsplit("/", 1)[0] + "/diffusers"
    assert cli.main([diffusers_dir, str(tmp_path / "bf16"), "--kind", "vae"]) == 0
    vae_bf16 = wan_vae.load_vae(str(tmp_path / "bf16"))
    torch_bf16 = copy.deepcopy(torch_vae).to(torch.bfloat16)
    video, latents = random_video((1, 5, 16, 24)), random_latents((1, 5, 16, 24))
    with torch.no_grad():
        encode = lambda m, v: (m.encode(v).latent_dist.mode().float() - MEAN) / STD
        decode = lambda m, z: m.decode((z * STD + MEAN).to(m.dtype)).sample.float()
        ref_latents = to_ours(encode(torch_vae, to_torch(video)))
        ref_video = to_ours(decode(torch_vae, to_torch(latents)))
        torch_latents_err = rel_err(
            to_ours(encode(torch_bf16, to_torch(video).to(torch.bfloat16))), ref_latents
        )
        torch_video_err = rel_err(to_ours(decode(torch_bf16, to_torch(latents))), ref_video)
    encoded = wan_vae.encode_video(vae_bf16, video)
    decoded = wan_vae.decode_latents(vae_bf16, latents)
    assert encoded.dtype == decoded.dtype == jnp.bfloat16
    assert rel_err(encoded, ref_latents, "bf16 encode vs fp32 diffusers") < 2 * torch_latents_err
    assert rel_err(decoded, ref_video, "bf16 decode vs fp32 diffusers") < 2 * torch_video_err


def test_presets_build_configs():
    from sama_jax import presets

    assert wan_vae.WanVAEConfig(**presets.VAE["wan_14b"]) == wan_vae.WanVAEConfig()
    assert wan_vae.WanVAEConfig(**presets.VAE["tiny"]).base_dim == 8
    with pytest.raises(ValueError, match="3 spatial and 2 temporal"):
        wan_vae.WanVAEConfig(temporal_downsample=(True, True, True))


def test_chunked_scan_equals_whole_video(vae):
    """Two implementations of the causal cache: the chunk scan and one pass over all frames."""
    video, latents = random_video((2, 9, 24, 16)), random_latents((2, 9, 24, 16))
    chunked = wan_vae.encode_video(vae, video)
    whole = wan_vae.encode_video(vae, video, chunked=False)
    assert rel_err(whole, chunked, "encode whole video vs chunked") < 1e-5
    chunked = wan_vae.decode_latents(vae, latents)
    whole = wan_vae.decode_latents(vae, latents, chunked=False)
    assert rel_err(whole, chunked, "decode whole video vs chunked") < 1e-5


def test_temporary_memory_is_flat_in_frames():
    """XLA's buffer plan for the chunked encoder: temporaries do not grow from 9 to 33 frames
    (a whole-video pass grows roughly linearly in T, by several full-resolution activations)."""
    cfg = wan_vae.WanVAEConfig(base_dim=8)
    model = nnx.eval_shape(lambda: wan_vae.WanVAE(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)  # shapes only: compiling needs no parameter values
    fn = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode_mean(v))

    def temp_bytes(frames):
        video = jax.ShapeDtypeStruct((1, frames, 16, 16, 3), jnp.float32)
        return fn.lower(state, video).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(9), temp_bytes(33)
    extra_activation = 24 * 16 * 16 * 8 * 4  # one 8-channel activation of the 24 extra frames
    assert large - small < 0.1 * extra_activation


def torch_decode_unclamped(model, latents):
    """diffusers' _decode loop (one latent frame at a time) without its final clamp."""
    model.clear_cache()
    x = model.post_quant_conv(latents * STD + MEAN)
    frames = []
    for i in range(x.shape[2]):
        model._conv_idx = [0]
        frames.append(
            model.decoder(
                x[:, :, i : i + 1], feat_cache=model._feat_map, feat_idx=model._conv_idx, first_chunk=i == 0
            )
        )
    model.clear_cache()
    return torch.cat(frames, 2)


def reference_tiled(run, x, tile, stride, up, down):
    """SAMA/DiffSynth tiling (wan_video_vae.py tiled_decode / tiled_encode) on (B, C, T, H, W):
    tiles every `stride` (dropped once the previous one reaches the edge), ramp masks over
    (tile - stride) * up / down output pixels on sides that overlap, sum(mask * out) / sum(mask)."""
    height, width = x.shape[3:]

    def ramp(length, border, left_edge, right_edge):
        mask = torch.ones(length)
        if not left_edge:
            mask[:border] = (torch.arange(border) + 1) / border
        if not right_edge:
            mask[-border:] = torch.flip((torch.arange(border) + 1) / border, dims=(0,))
        return mask

    values = weight = None
    for h in range(0, height, stride[0]):
        if h - stride[0] >= 0 and h - stride[0] + tile[0] >= height:
            continue
        for w in range(0, width, stride[1]):
            if w - stride[1] >= 0 and w - stride[1] + tile[1] >= width:
                continue
            out = run(x[:, :, :, h : h + tile[0], w : w + tile[1]])
            mask_h = ramp(out.shape[3], (tile[0] - stride[0]) * up // down, h == 0, h + tile[0] >= height)
            mask_w = ramp(out.shape[4], (tile[1] - stride[1]) * up // down, w == 0, w + tile[1] >= width)
            mask = torch.minimum(mask_h[:, None], mask_w[None, :])
            if values is None:
                values = torch.zeros(out.shape[:3] + (height * up // down, width * up // down))
                weight = torch.zeros(values.shape[3:])
            th, tw = h * up // down, w * up // down
            values[:, :, :, th : th + out.shape[3], tw : tw + out.shape[4]] += out * mask
            weight[th : th + out.shape[3], tw : tw + out.shape[4]] += mask
    return values / weight


def test_tiled_decode_matches_reference_tiling(vae, torch_vae):
    """8x12 latents in 4x6 tiles every 2x3 (halves overlap, like SAMA's 30x52 every 15x26)."""
    latents = random_latents((1, 5, 64, 96))
    with torch.no_grad():
        ref = reference_tiled(
            lambda z: torch_decode_unclamped(torch_vae, z), to_torch(latents), (4, 6), (2, 3), up=8, down=1
        ).clamp(-1, 1)
    tiled = np.asarray(wan_vae.decode_latents(vae, latents, tiled=True, tile_size=(4, 6), tile_stride=(2, 3)))
    assert rel_err(tiled, to_ours(ref), "tiled decode vs reference tiling") < 1e-5
    # Against the untiled decode: each tile's middle attention and convs see only the tile, so
    # tiling approximates. For this random tiny model (|output| mean 0.05): max |diff| 0.19,
    # mean 0.021; the bounds below are those plus a margin.
    full = np.asarray(wan_vae.decode_latents(vae, latents))
    err = np.abs(tiled - full)
    print(f"tiled vs untiled decode: max |diff| {err.max():.3f}, mean {err.mean():.4f}")
    assert err.max() < 0.25 and err.mean() < 0.03


def test_tiled_encode_matches_reference_tiling(vae, torch_vae):
    video = random_video((1, 5, 64, 96))
    with torch.no_grad():
        ref = reference_tiled(
            lambda v: (torch_vae.encode(v).latent_dist.mode() - MEAN) / STD,
            to_torch(video),
            (32, 48),
            (16, 24),
            up=1,
            down=8,
        )
    tiled = wan_vae.encode_video(vae, video, tiled=True, tile_size=(4, 6), tile_stride=(2, 3))
    assert rel_err(tiled, to_ours(ref), "tiled encode vs reference tiling") < 2e-6


def test_tile_layout_and_blend_weights():
    # SAMA's 480x832 decode: 60x104 latents -> 3x3 tiles of 30x52.
    assert wan_vae.tile_starts(60, 30, 15) == [0, 15, 30]
    assert wan_vae.tile_starts(104, 52, 26) == [0, 26, 52]
    assert wan_vae.tile_starts(70, 30, 15) == [0, 15, 30, 45]  # the last tile is cut by the edge
    np.testing.assert_allclose(wan_vae.ramp_mask(6, 3, False, True), [1 / 3, 2 / 3, 1, 1, 1, 1])
    np.testing.assert_allclose(wan_vae.ramp_mask(6, 3, True, False), [1, 1, 1, 1, 2 / 3, 1 / 3])
    # Blending a tile-local map reproduces it exactly: the weights form a partition of unity,
    # including cut-short edge tiles.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 9, 14, 2)), jnp.float32)
    upsample = lambda t: jnp.repeat(jnp.repeat(t, 8, axis=2), 8, axis=3)
    out = wan_vae._blend_tiles(upsample, x, (4, 6), (2, 3), up=8, down=1)
    np.testing.assert_allclose(out, upsample(x), rtol=1e-6, atol=1e-6)


def test_frame_count_and_size_errors(vae):
    with pytest.raises(ValueError, match=r"has 4 frames.*4k\+1.*pad_frames=True"):
        wan_vae.encode_video(vae, random_video((1, 4, 16, 16)))
    with pytest.raises(ValueError, match="multiples of 8"):
        wan_vae.encode_video(vae, random_video((1, 5, 12, 16)))
    with pytest.raises(ValueError, match=r"latents must be \(B, T, h, w, 16\)"):
        wan_vae.decode_latents(vae, np.zeros((1, 1, 2, 2, 4), np.float32))
    video = random_video((1, 4, 16, 16))
    padded = np.concatenate([video, video[:, -1:]], axis=1)
    np.testing.assert_array_equal(
        wan_vae.encode_video(vae, video, pad_frames=True), wan_vae.encode_video(vae, padded)
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "axes,rules",
    [
        # batch over data, rows of every activation over context
        ({"data": 2, "context": 4}, dict(sharding.DEFAULT_RULES, spatial="context")),
        # batch over data, conv output channels over tensor
        ({"data": 2, "tensor": 4}, dict(sharding.DEFAULT_RULES)),
    ],
    ids=["batch-spatial", "batch-tensor"],
)
def test_sharded_equals_unsharded(vae, vae_path, axes, rules):
    rules_dict, rules = rules, tuple(rules.items())
    mesh = sharding.create_mesh({"ici": axes})
    sharded_vae = wan_vae.load_vae(vae_path, mesh=mesh, rules=rules)
    assert len(sharded_vae.encoder.conv_in.kernel[...].sharding.device_set) == 8
    video, latents = random_video((2, 5, 32, 16)), random_latents((2, 5, 32, 16))
    expected_latents = wan_vae.encode_video(vae, video)
    expected_video = wan_vae.decode_latents(vae, latents)
    with sharding.use_mesh(mesh, rules):
        video = sharding.shard_batch(video, mesh, rules)
        latents = sharding.shard_batch(latents, mesh, rules)
        got_latents = wan_vae.encode_video(sharded_vae, video)
        got_video = wan_vae.decode_latents(sharded_vae, latents)
    assert got_latents.sharding.spec[0] == "data" and got_video.sharding.spec[0] == "data"
    if rules_dict["spatial"] == "context":  # frames were split by rows, not gathered
        assert got_latents.sharding.spec[2] == "context" and got_video.sharding.spec[2] == "context"
    assert rel_err(got_latents, expected_latents, f"sharded encode {axes}") < 1e-5
    assert rel_err(got_video, expected_video, f"sharded decode {axes}") < 1e-5
