"""umT5 encoder: parity with transformers' UMT5EncoderModel through our converter (both layouts).

Metric: max|ours - ref| / max|ref| over the real (unpadded) tokens, fp32.
"""

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from transformers import UMT5Config, UMT5EncoderModel

from convert_wan_weights import cli
from convert_wan_weights import umt5 as umt5_converter
from sama_jax import params_io, presets, sharding, text
from sama_jax.models import load_text_encoder
from sama_jax.models.umt5 import UMT5Config as OurConfig
from sama_jax.models.umt5 import relative_position_buckets
from sama_jax.tensor_source import ConversionError, TensorSource

TINY = presets.TEXT_ENCODER["tiny"]


def reference_model(num_buckets=TINY["num_buckets"], max_distance=TINY["max_distance"]):
    config = UMT5Config(
        vocab_size=TINY["vocab_size"],
        d_model=TINY["dim"],
        d_ff=TINY["ffn_dim"],
        num_heads=TINY["num_heads"],
        d_kv=TINY["dim"] // TINY["num_heads"],
        num_layers=TINY["num_layers"],
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=max_distance,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    model = UMT5EncoderModel(config).eval()
    # Random norm scales so a norm mapped to the wrong place cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.5 * torch.rand_like(p))
    return model


def inputs(seq_len, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, TINY["vocab_size"], (len(lengths), seq_len), generator=g)
    mask = (torch.arange(seq_len)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def reference_output(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()


def rel_err(ours, ref, mask):
    valid = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(ours)[valid] - ref[valid]).max() / np.abs(ref[valid]).max())


def convert(checkpoint, out):
    assert cli.detect_kind(TensorSource(str(checkpoint))) == "umt5"  # --kind auto recognises it
    assert cli.main([str(checkpoint), str(out), "--dtype", "float32"]) == 0
    return load_text_encoder(str(out))


def test_transformers_layout_parity(tmp_path):
    ref = reference_model()
    ref.save_pretrained(tmp_path / "hf")  # model.safetensors + config.json, as users have it
    model = convert(tmp_path / "hf", tmp_path / "ours")
    assert model.cfg.max_distance == TINY["max_distance"]
    ids, mask = inputs(16, [16, 9])
    expected = reference_output(ref, ids, mask)
    err = rel_err(model(ids.numpy(), mask.numpy()), expected, mask)
    assert err < 1e-5, err
    # The pipeline's encode zeroes every position past the true length.
    encoded = np.asarray(text.encode(model, ids.numpy(), mask.numpy()))
    assert np.all(encoded[1, 9:] == 0) and np.abs(encoded[1, :9]).min() > 0
    assert rel_err(encoded, expected, mask) < 1e-5


def official_state_dict(ref):
    """transformers UMT5EncoderModel weights renamed to Wan2.1's models_t5_umt5-xxl-enc layout."""
    sd = ref.state_dict()
    out = {
        "token_embedding.weight": sd["shared.weight"],
        "norm.weight": sd["encoder.final_layer_norm.weight"],
    }
    names = {
        "layer.0.layer_norm": "norm1",
        "layer.1.layer_norm": "norm2",
        "layer.0.SelfAttention.q": "attn.q",
        "layer.0.SelfAttention.k": "attn.k",
        "layer.0.SelfAttention.v": "attn.v",
        "layer.0.SelfAttention.o": "attn.o",
        "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
        "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
        "layer.1.DenseReluDense.wi_1": "ffn.fc1",
        "layer.1.DenseReluDense.wo": "ffn.fc2",
    }
    for i in range(ref.config.num_layers):
        for theirs, ours in names.items():
            out[f"blocks.{i}.{ours}.weight"] = sd[f"encoder.block.{i}.{theirs}.weight"]
    return {k: v.to(torch.bfloat16) for k, v in out.items()}


def test_official_layout_parity(tmp_path):
    # The official file carries no config: the converter assumes umT5-XXL's 32 buckets / distance 128.
    ref = reference_model(num_buckets=32, max_distance=128).to(torch.bfloat16).float()
    torch.save(official_state_dict(ref), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    model = convert(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", tmp_path / "ours")
    ids, mask = inputs(40, [40, 23], seed=1)  # distances up to 39: exact and log buckets
    err = rel_err(model(ids.numpy(), mask.numpy()), reference_output(ref, ids, mask), mask)
    assert err < 1e-5, err


def test_untied_zero_embedding_and_decoder_tensors_are_ignored(tmp_path):
    ref = reference_model()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["encoder.embed_tokens.weight"] = torch.zeros_like(sd["shared.weight"])  # transformers 5.x quirk
    sd["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.ones(4, 4)
    sd["lm_head.weight"] = torch.ones(3, 4)
    save_file(sd, str(tmp_path / "model.safetensors"))
    ref.config.save_pretrained(tmp_path)  # max_distance (16 here) is read from config.json
    model = convert(tmp_path / "model.safetensors", tmp_path / "ours")
    ids, mask = inputs(16, [12, 16])
    assert rel_err(model(ids.numpy(), mask.numpy()), reference_output(ref, ids, mask), mask) < 1e-5


def test_relative_buckets_match_transformers_at_xxl_size():
    model = reference_model(num_buckets=32, max_distance=128)
    attention = model.encoder.block[0].layer[0].SelfAttention
    relative = torch.arange(512)[None, :] - torch.arange(512)[:, None]
    expected = attention._relative_position_bucket(relative).numpy()
    np.testing.assert_array_equal(relative_position_buckets(512, 512, 32, 128), expected)


def test_bf16_checkpoint_runs_in_bf16(tmp_path):
    ref = reference_model()
    ref.save_pretrained(tmp_path / "hf")
    assert cli.main([str(tmp_path / "hf"), str(tmp_path / "ours"), "--kind", "umt5"]) == 0  # bf16
    model = load_text_encoder(str(tmp_path / "ours"))
    assert model.cfg.compute_dtype == "bfloat16"
    assert model.blocks.attn.q.kernel[...].dtype == jax.numpy.bfloat16
    ids, mask = inputs(16, [16, 7])
    out = model(ids.numpy(), mask.numpy())
    err = rel_err(out.astype(np.float32), reference_output(ref, ids, mask), mask)
    assert err < 3e-2, err


def test_sharded_load_matches_unsharded(tmp_path):
    ref = reference_model()
    ref.save_pretrained(tmp_path / "hf")
    plain = convert(tmp_path / "hf", tmp_path / "ours")
    mesh = sharding.create_mesh(dict(ici=dict(fsdp=4, tensor=2)))
    sharded = load_text_encoder(str(tmp_path / "ours"), mesh=mesh)
    kernel = sharded.blocks.ffn.fc1.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (
        TINY["num_layers"],
        TINY["dim"] // 4,
        TINY["ffn_dim"] // 2,
    )
    ids, mask = inputs(16, [16, 5, 11, 1])
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        out = nnx.jit(text.encode)(sharded, ids.numpy(), mask.numpy())
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(text.encode(plain, ids.numpy(), mask.numpy())), rtol=1e-5, atol=1e-6
    )


def test_converter_errors_name_file_and_tensors(tmp_path):
    sd = {
        k: v.contiguous()
        for k, v in reference_model().state_dict().items()
        if k != "encoder.embed_tokens.weight"
    }
    del sd["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    sd["encoder.block.0.layer.0.SelfAttention.o.weight"] = torch.zeros(5, 32)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ConversionError) as e:
        umt5_converter.convert(
            TensorSource(str(path)),
            str(tmp_path / "out"),
            type("Args", (), dict(dtype="float32", overwrite=False))(),
        )
    message = str(e.value)
    assert str(path) in message
    assert "encoder.block.1.layer.1.DenseReluDense.wi_1.weight" in message
    assert "encoder.block.0.layer.0.SelfAttention.o.weight: checkpoint (5, 32), expected (32, 32)" in message


def test_loader_rejects_a_checkpoint_that_does_not_fit(tmp_path):
    config = dict(TINY, dtype="float32", param_dtype="float32")
    params_io.save_params(
        str(tmp_path / "bad"), {"token_embedding": {"embedding": np.zeros((3, 2))}}, "umt5", config
    )
    expected = r"(?s)does not fit the umt5 model.*missing blocks.*checkpoint \(3, 2\), model \(512, 32\)"
    with pytest.raises(params_io.ParamsCheckpointError, match=expected):
        load_text_encoder(str(tmp_path / "bad"))
    params_io.save_params(str(tmp_path / "other"), {"w": np.zeros(2)}, "siglip", {})
    with pytest.raises(params_io.ParamsCheckpointError, match="holds a 'siglip' checkpoint"):
        load_text_encoder(str(tmp_path / "other"))
    assert OurConfig(**TINY).head_dim == TINY["dim"] // TINY["num_heads"]
