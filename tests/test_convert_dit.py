"""DiT converter: every layout users have, SAMA's extra keys, base-Wan initialisation, stored dtype,
and a clear error for each kind of mismatch."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from wan_reference import (
    SamaExtras,
    official_state_dict,
    options,
    save_diffusers_layout,
    save_official_sharded,
    tiny_diffusers_wan,
)

from convert_wan_weights import cli
from convert_wan_weights import dit as convert_dit
from sama_jax import params_io
from sama_jax.tensor_source import ConversionError, TensorSource

DIM, HEADS, SEM, HIDDEN = 48, 3, 20, 28


@pytest.fixture(scope="module")
def torch_model():
    return tiny_diffusers_wan(num_heads=HEADS, num_layers=2)


@pytest.fixture(scope="module")
def extras():
    return SamaExtras(dim=DIM, semantic_dim=SEM, hidden_dim=HIDDEN)


def _convert(path, out, **kw):
    summary = convert_dit.convert(TensorSource(str(path)), str(out), options(**kw))
    params, config = params_io.load_params(str(out), expected_kind="wan_dit")
    return summary, params, config


def _leaves(params):
    return dict(jax.tree_util.tree_flatten_with_path(params)[0])


def test_official_single_sharded_and_diffusers_layouts_agree(tmp_path, torch_model):
    state = official_state_dict(torch_model)
    save_file(state, str(tmp_path / "single.safetensors"))
    index = save_official_sharded(state, str(tmp_path / "sharded"), num_shards=3)
    save_diffusers_layout(torch_model, tmp_path / "diffusers")

    s1, single, config = _convert(
        tmp_path / "single.safetensors", tmp_path / "a", allow_base_wan=True, num_heads=HEADS
    )
    s2, sharded, _ = _convert(index, tmp_path / "b", allow_base_wan=True, num_heads=HEADS)
    s3, diffusers, config3 = _convert(tmp_path / "diffusers", tmp_path / "c", allow_base_wan=True)
    assert (s1["layout"], s2["layout"], s3["layout"]) == ("official", "official", "diffusers")
    assert config == config3
    assert (config["dim"], config["num_heads"], config["num_layers"], config["ffn_dim"]) == (48, 3, 2, 40)
    assert (config["text_dim"], config["freq_dim"], config["patch_size"]) == (24, 32, [1, 2, 2])
    for other in (sharded, diffusers):
        a, b = _leaves(single), _leaves(other)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # Spot checks of the key mapping and the transposes.
    ref = {k: v.numpy() for k, v in state.items()}
    np.testing.assert_array_equal(single["blocks"]["ffn"]["fc1"]["kernel"][1], ref["blocks.1.ffn.0.weight"].T)
    np.testing.assert_array_equal(single["blocks"]["norm3"]["scale"][0], ref["blocks.0.norm3.weight"])
    np.testing.assert_array_equal(
        single["blocks"]["cross_attn"]["o"]["bias"][1], ref["blocks.1.cross_attn.o.bias"]
    )
    np.testing.assert_array_equal(
        single["patch_embedding"]["kernel"], ref["patch_embedding.weight"].transpose(2, 3, 4, 1, 0)
    )
    np.testing.assert_array_equal(single["head"]["modulation"], ref["head.modulation"])


def test_sama_state_dict_and_prefix(tmp_path, torch_model, extras):
    state = {"model.diffusion_model." + k: v for k, v in official_state_dict(torch_model, extras).items()}
    save_file(state, str(tmp_path / "sama.safetensors"))
    summary, params, config = _convert(tmp_path / "sama.safetensors", tmp_path / "out", num_heads=HEADS)
    assert summary["initialised"] == []
    assert (config["semantic_dim"], config["semantic_hidden_dim"], config["num_segments"]) == (SEM, HIDDEN, 3)
    ref = {k: v.detach().numpy() for k, v in extras.state_dict().items()}
    np.testing.assert_array_equal(params["segment_embedding"], ref["segment_embedding.weight"])
    np.testing.assert_array_equal(
        params["siglip_feat_mlp"]["fc1"]["kernel"], ref["siglip_feat_mlp.fc1.weight"].T
    )
    np.testing.assert_array_equal(
        params["siglip_feat_mlp"]["norm"]["scale"], ref["siglip_feat_mlp.norm.weight"]
    )
    np.testing.assert_array_equal(params["semantic_head"]["proj"]["bias"], ref["semantic_head.proj.bias"])


def test_base_wan_initialises_sama_modules_as_the_official_code(tmp_path, torch_model):
    save_file(official_state_dict(torch_model), str(tmp_path / "wan.safetensors"))
    summary, params, config = _convert(
        tmp_path / "wan.safetensors", tmp_path / "out", allow_base_wan=True, num_heads=HEADS
    )
    assert len(summary["initialised"]) == 11
    assert (config["semantic_dim"], config["semantic_hidden_dim"]) == (1152, 1024)
    assert np.all(params["segment_embedding"] == 0)
    np.testing.assert_array_equal(params["siglip_feat_mlp"]["norm"]["scale"], np.ones(1152))
    fc1 = params["siglip_feat_mlp"]["fc1"]["kernel"]
    assert fc1.shape == (1152, 1024) and np.abs(fc1).max() <= 1 / np.sqrt(1152)
    assert np.abs(fc1).max() > 0.9 / np.sqrt(1152)  # uniform over the whole range
    proj = params["semantic_head"]["proj"]
    assert np.abs(proj["kernel"]).max() <= np.sqrt(6 / (DIM + 1152))
    assert 0.5e-3 < proj["bias"].std() < 1.5e-3


def test_bfloat16_storage_and_cli(tmp_path, torch_model, capsys):
    save_diffusers_layout(torch_model, tmp_path / "diffusers")
    out = tmp_path / "ckpt"
    assert cli.main([str(tmp_path / "diffusers"), str(out), "--allow-base-wan"]) == 0
    params, config = params_io.load_params(str(out), expected_kind="wan_dit")
    assert params["blocks"]["self_attn"]["q"]["kernel"].dtype == ml_dtypes.bfloat16
    assert config["num_heads"] == HEADS
    # Without --overwrite an existing output is refused; with it, replaced.
    assert cli.main([str(tmp_path / "diffusers"), str(out), "--allow-base-wan"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (
        cli.main(
            [str(tmp_path / "diffusers"), str(out), "--allow-base-wan", "--overwrite", "--dtype", "float32"]
        )
        == 0
    )
    params, _ = params_io.load_params(str(out))
    assert params["blocks"]["self_attn"]["q"]["kernel"].dtype == np.float32


def _error(tmp_path, state, **kw):
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ConversionError) as info:
        convert_dit.convert(TensorSource(str(path)), str(tmp_path / "out"), options(**kw))
    assert str(path) in str(info.value)
    assert not os.path.exists(tmp_path / "out")
    return str(info.value)


def test_errors_list_missing_unexpected_and_misshaped(tmp_path, torch_model, extras):
    state = official_state_dict(torch_model, extras)
    missing = {k: v for k, v in state.items() if k != "blocks.1.cross_attn.norm_k.weight"}
    message = _error(tmp_path, missing, num_heads=HEADS)
    assert "missing (1)" in message and "blocks.1.cross_attn.norm_k.weight" in message

    unexpected = dict(state, **{"blocks.0.cross_attn.k_img.weight": torch.zeros(48, 48)})
    message = _error(tmp_path, unexpected, num_heads=HEADS)
    assert "unexpected (1)" in message and "blocks.0.cross_attn.k_img.weight" in message

    misshaped = dict(state, **{"blocks.0.self_attn.v.bias": torch.zeros(47)})
    message = _error(tmp_path, misshaped, num_heads=HEADS)
    assert "wrong shape (1)" in message and "checkpoint (47,), expected (48,)" in message


def test_errors_for_base_wan_without_flag_and_unknown_sizes(tmp_path, torch_model):
    state = official_state_dict(torch_model)
    message = _error(tmp_path, state, num_heads=HEADS)
    assert "missing (11)" in message and "segment_embedding.weight" in message
    assert "--allow-base-wan" in message

    message = _error(tmp_path, state, allow_base_wan=True)
    assert "number of attention heads" in message and "num_attention_heads" in message

    message = _error(tmp_path, state, allow_base_wan=True, num_heads=5)
    assert "not divisible by num_heads 5" in message

    message = _error(tmp_path, {"encoder.conv1.weight": torch.zeros(2, 2)})
    assert "not a Wan2.1 DiT checkpoint" in message


def test_heads_from_config_json_and_detection(tmp_path, torch_model):
    state = official_state_dict(torch_model)
    folder = tmp_path / "official"
    folder.mkdir()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    with open(folder / "config.json", "w") as f:
        json.dump({"num_heads": HEADS, "text_len": 8}, f)
    source = TensorSource(str(folder))
    assert convert_dit.matches(source)
    assert cli.detect_kind(source) == "dit"
    _, _, config = _convert(folder, tmp_path / "out", allow_base_wan=True)
    assert (config["num_heads"], config["text_len"]) == (HEADS, 8)
    save_file({"decoder.conv1.weight": torch.zeros(2)}, str(tmp_path / "vae.safetensors"))
    assert not convert_dit.matches(TensorSource(str(tmp_path / "vae.safetensors")))


def test_cli_takes_the_head_count_for_an_official_checkpoint_without_config(tmp_path, torch_model):
    save_file(official_state_dict(torch_model), str(tmp_path / "official.safetensors"))
    out = tmp_path / "ckpt"
    assert (
        cli.main(
            [
                str(tmp_path / "official.safetensors"),
                str(out),
                "--kind",
                "dit",
                "--allow-base-wan",
                "--num-heads",
                str(HEADS),
                "--text-len",
                "8",
            ]
        )
        == 0
    )
    _, config = params_io.load_params(str(out), expected_kind="wan_dit")
    assert (config["num_heads"], config["text_len"]) == (HEADS, 8)
