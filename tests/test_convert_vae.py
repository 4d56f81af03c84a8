"""convert-wan-weights --kind vae: official Wan2.1_VAE.pth and diffusers AutoencoderKLWan layouts.

The official layout is produced here by renaming a diffusers state dict with rules written in this
test, and those rules are checked against diffusers' own official->diffusers converter, so the test
does not trust the converter's key table to test itself.
"""

import json
import os
import re

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from convert_wan_weights import cli
from convert_wan_weights import vae as vae_converter
from sama_jax import params_io
from sama_jax.models import wan_vae, wan_vae_params
from sama_jax.tensor_source import ConversionError, TensorSource

NUM_RES_BLOCKS = 2


def official_key(key: str) -> str:
    """diffusers AutoencoderKLWan key -> Wan2.1_VAE.pth key (for dim_mult of length 4)."""
    key = re.sub(r"^quant_conv\.", "conv1.", key)
    key = re.sub(r"^post_quant_conv\.", "conv2.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", key)
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", key)
    key = key.replace("encoder.down_blocks.", "encoder.downsamples.")
    key = re.sub(r"\.mid_block\.resnets\.0\.", ".middle.0.", key)
    key = re.sub(r"\.mid_block\.attentions\.0\.", ".middle.1.", key)
    key = re.sub(r"\.mid_block\.resnets\.1\.", ".middle.2.", key)
    per_stage = NUM_RES_BLOCKS + 2  # residual blocks + a resample block per upsampling stage
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
        lambda m: f"decoder.upsamples.{int(m[1]) * per_stage + int(m[2])}.",
        key,
    )
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"decoder.upsamples.{int(m[1]) * per_stage + NUM_RES_BLOCKS + 1}.",
        key,
    )
    block = r"^((?:encoder|decoder)\.(?:downsamples|upsamples|middle)\.\d+)\."
    for ours, theirs in (
        ("norm1", "residual.0"),
        ("conv1", "residual.2"),
        ("norm2", "residual.3"),
        ("conv2", "residual.6"),
        ("conv_shortcut", "shortcut"),
    ):
        key = re.sub(block + ours + r"\.", r"\1." + theirs + ".", key)
    return key


def tiny_torch_vae() -> AutoencoderKLWan:
    model = AutoencoderKLWan(base_dim=8, z_dim=16, num_res_blocks=NUM_RES_BLOCKS).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # default ones would hide a wrong norm mapping
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


class Args:
    dtype = "float32"
    allow_base_wan = False
    overwrite = False


def test_official_renaming_agrees_with_diffusers_converter():
    with torch.device("meta"):
        keys = list(AutoencoderKLWan().state_dict())
    renamed = {official_key(k): k for k in keys}
    assert len(renamed) == len(keys) == 194
    assert convert_wan_vae_to_diffusers(renamed) == {k: k for k in keys}


def test_key_table_matches_full_size_model():
    with torch.device("meta"):
        state = AutoencoderKLWan().state_dict()
    table = wan_vae_params.entries(wan_vae.WanVAEConfig())
    assert {e.diffusers: e.torch_shape for e in table} == {k: tuple(v.shape) for k, v in state.items()}
    assert {e.official for e in table} == {official_key(k) for k in state}
    assert sum(int(np.prod(e.torch_shape)) for e in table) == 126_892_531


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny torch VAE saved in both layouts; returns (model, diffusers dir, official .pth)."""
    root = tmp_path_factory.mktemp("vae_layouts")
    model = tiny_torch_vae()
    diffusers_dir = str(root / "diffusers")
    model.save_pretrained(diffusers_dir)
    official = str(root / "Wan2.1_VAE.pth")
    torch.save({official_key(k): v for k, v in model.state_dict().items()}, official)
    return model, diffusers_dir, official


def test_both_layouts_convert_to_the_same_params(checkpoints, tmp_path):
    model, diffusers_dir, official = checkpoints
    for name, src in (("d", diffusers_dir), ("o", official)):
        assert cli.detect_kind(TensorSource(src)) == "vae"
        assert cli.main([src, str(tmp_path / name), "--dtype", "float32"]) == 0  # --kind auto
    from_diffusers, config = params_io.load_params(str(tmp_path / "d"), expected_kind="wan_vae")
    from_official, _ = params_io.load_params(str(tmp_path / "o"), expected_kind="wan_vae")
    assert config["base_dim"] == 8 and list(config["dim_mult"]) == [1, 2, 4, 4]
    assert list(config["temporal_downsample"]) == [False, True, True]
    assert config["num_res_blocks"] == 2 and config["z_dim"] == 16
    assert jax.tree.structure(from_diffusers) == jax.tree.structure(from_official)
    jax.tree.map(np.testing.assert_array_equal, from_diffusers, from_official)
    # Spot-check each tensor layout against the torch weights.
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    enc, dec = from_diffusers["encoder"], from_diffusers["decoder"]
    np.testing.assert_array_equal(
        enc["conv_in"]["kernel"], sd["encoder.conv_in.weight"].transpose(2, 3, 4, 1, 0)
    )
    np.testing.assert_array_equal(
        enc["down_blocks"]["2"]["conv"]["kernel"],
        sd["encoder.down_blocks.2.resample.1.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        dec["mid_block"]["attention"]["to_qkv"]["kernel"],
        sd["decoder.mid_block.attentions.0.to_qkv.weight"][:, :, 0, 0].T,
    )
    np.testing.assert_array_equal(
        dec["up_blocks"]["1"]["resnets"]["0"]["norm1"]["gamma"],
        sd["decoder.up_blocks.1.resnets.0.norm1.gamma"].reshape(-1),
    )
    np.testing.assert_array_equal(
        dec["up_blocks"]["0"]["upsampler"]["time_conv"]["bias"],
        sd["decoder.up_blocks.0.upsamplers.0.time_conv.bias"],
    )


def test_layout_detection(checkpoints, tmp_path):
    _, diffusers_dir, official = checkpoints
    assert vae_converter.layout_of(TensorSource(diffusers_dir)) == "diffusers"
    assert vae_converter.layout_of(TensorSource(official)) == "official"
    other = str(tmp_path / "other.safetensors")
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, other)
    assert not vae_converter.matches(TensorSource(other))
    with pytest.raises(ConversionError, match="not a Wan2.1 VAE checkpoint"):
        vae_converter.convert(TensorSource(other), str(tmp_path / "out"), Args())


def test_missing_and_misshaped_tensors_are_listed(checkpoints, tmp_path, capsys):
    model, _, _ = checkpoints
    state = {official_key(k): v for k, v in model.state_dict().items()}
    del state["decoder.upsamples.4.shortcut.weight"]
    state["encoder.middle.1.proj.bias"] = torch.zeros(7)
    state["encoder.extra.weight"] = torch.zeros(1)
    bad = str(tmp_path / "bad.pth")
    torch.save(state, bad)
    with pytest.raises(ConversionError) as err:
        vae_converter.convert(TensorSource(bad), str(tmp_path / "out"), Args())
    message = str(err.value)
    assert bad in message
    assert "missing (1)" in message and "decoder.upsamples.4.shortcut.weight" in message
    assert "unexpected (1)" in message and "encoder.extra.weight" in message
    assert "encoder.middle.1.proj.bias: checkpoint (7,), expected (32,)" in message
    assert not os.path.exists(tmp_path / "out")
    assert cli.main([bad, str(tmp_path / "out"), "--kind", "vae"]) == 2
    assert "decoder.upsamples.4.shortcut.weight" in capsys.readouterr().err


def test_wan22_diffusers_config_is_rejected(checkpoints, tmp_path):
    model, _, _ = checkpoints
    model.save_pretrained(str(tmp_path / "wan22"))
    config_path = tmp_path / "wan22" / "config.json"
    config = json.loads(config_path.read_text())
    config["is_residual"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="Wan2.2 VAE"):
        vae_converter.convert(TensorSource(str(tmp_path / "wan22")), str(tmp_path / "out"), Args())


def test_bfloat16_checkpoint_loads_in_bfloat16(checkpoints, tmp_path):
    _, diffusers_dir, _ = checkpoints
    assert cli.main([diffusers_dir, str(tmp_path / "bf16"), "--kind", "vae"]) == 0
    params, config = params_io.load_params(str(tmp_path / "bf16"))
    assert config["compute_dtype"] == "bfloat16"
    assert {np.asarray(x).dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    vae = wan_vae.load_vae(str(tmp_path / "bf16"))
    assert vae.encoder.conv_in.kernel[...].dtype == jax.numpy.bfloat16
    assert vae.config.compute_dtype == "bfloat16"


def test_load_vae_reports_shape_mismatches(checkpoints, tmp_path):
    _, diffusers_dir, _ = checkpoints
    assert cli.main([diffusers_dir, str(tmp_path / "ok"), "--kind", "vae", "--dtype", "float32"]) == 0
    params, config = params_io.load_params(str(tmp_path / "ok"))
    params["decoder"]["conv_in"]["bias"] = np.zeros((5,), np.float32)
    del params["quant_conv"]
    params_io.save_params(str(tmp_path / "bad"), params, "wan_vae", config)
    with pytest.raises(params_io.ParamsCheckpointError) as err:
        wan_vae.load_vae(str(tmp_path / "bad"))
    assert "decoder/conv_in/bias: checkpoint (5,), model (32,)" in str(err.value)
    assert "missing quant_conv/kernel" in str(err.value)
