"""SigLIP vision tower: parity with transformers' SiglipVisionModel through our converter.

Metric: max|ours - ref| / max|ref| of last_hidden_state (after post_layernorm), fp32.
"""

import jax
import numpy as np
import pytest
import torch
from model_helpers import tiny_hf_siglip_config
from PIL import Image
from safetensors.torch import save_file
from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionModel

from convert_wan_weights import cli
from convert_wan_weights import siglip as siglip_converter
from sama_jax import presets
from sama_jax.models import load_siglip
from sama_jax.models.siglip import preprocess
from sama_jax.tensor_source import ConversionError, TensorSource

TINY = presets.SIGLIP["tiny"]


def randomize_norms(model):
    # LayerNorms start at (1, 0): make them random so a misplaced norm cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "post_layernorm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model


def pixels(batch=2):
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, TINY["image_size"], TINY["image_size"], generator=g) * 2 - 1


def rel_err(ours, ref):
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def convert(checkpoint, out):
    assert cli.detect_kind(TensorSource(str(checkpoint))) == "siglip"  # --kind auto recognises it
    assert cli.main([str(checkpoint), str(out), "--dtype", "float32"]) == 0
    return load_siglip(str(out))


def test_flat_layout_parity(tmp_path):
    ref = randomize_norms(SiglipVisionModel(tiny_hf_siglip_config()).eval())
    ref.save_pretrained(tmp_path / "hf")  # transformers 5 writes the flat layout here
    source = TensorSource(str(tmp_path / "hf"))
    assert siglip_converter.prefix_of(source) == ""
    model = convert(tmp_path / "hf", tmp_path / "ours")
    x = pixels()
    with torch.no_grad():
        expected = ref(pixel_values=x).last_hidden_state.numpy()
    ours = model(x.numpy().transpose(0, 2, 3, 1))
    assert ours.shape == (2, (TINY["image_size"] // TINY["patch_size"]) ** 2, TINY["hidden_size"])
    err = rel_err(ours, expected)
    assert err < 1e-5, err


def test_prefixed_full_siglip_model_parity(tmp_path):
    # A full SiglipModel checkpoint (as google/siglip-so400m-patch14-384 is published): vision_model.*
    # prefix, plus text tower, logit scale/bias and the MAP head, all of which the converter drops.
    text = SiglipTextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
    )
    full = SiglipModel(
        SiglipConfig(text_config=text.to_dict(), vision_config=tiny_hf_siglip_config().to_dict())
    )
    full = randomize_norms(full.eval())
    full.save_pretrained(tmp_path / "hf")
    source = TensorSource(str(tmp_path / "hf"))
    assert siglip_converter.prefix_of(source) == "vision_model."
    assert any(k.startswith("vision_model.head.") for k in source.keys())
    assert siglip_converter.matches(source)
    model = convert(tmp_path / "hf", tmp_path / "ours")
    x = pixels(3)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=x).last_hidden_state.numpy()
    err = rel_err(model(x.numpy().transpose(0, 2, 3, 1)), expected)
    assert err < 1e-5, err


def test_preprocess_matches_the_transformers_processor():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    yy, xx = np.mgrid[0:90, 0:120]
    smooth = np.stack([127 + 100 * np.sin(xx / 9.0), 127 + 100 * np.cos(yy / 7.0), 60 + xx], -1)
    noise = np.random.default_rng(0).integers(0, 256, (90, 120, 3))
    processor = SiglipImageProcessorPil(size={"height": 56, "width": 56})
    for image in (smooth.clip(0, 255).astype(np.uint8), noise.astype(np.uint8)):
        expected = processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0]
        ours = np.asarray(preprocess(image[None], 56))[0]
        # Differences are PIL's uint8 rounding of the resized image: one level is 2/255 = 0.0078.
        assert np.abs(ours - expected.transpose(1, 2, 0)).max() < 0.01
    exact = np.asarray(preprocess(np.array([[[[0, 255, 51]]]], np.uint8), 1))
    np.testing.assert_allclose(exact.ravel(), [-1.0, 1.0, -0.6], atol=1e-6)


def test_wrong_input_size_is_a_clear_error(tmp_path):
    SiglipVisionModel(tiny_hf_siglip_config()).save_pretrained(tmp_path / "hf")
    model = convert(tmp_path / "hf", tmp_path / "ours")
    with pytest.raises(ValueError, match="use siglip.preprocess"):
        model(np.zeros((1, 32, 32, 3), np.float32))


def test_converter_needs_heads_from_config_json(tmp_path):
    sd = {k: v.contiguous() for k, v in SiglipVisionModel(tiny_hf_siglip_config()).state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))  # no config.json beside it
    with pytest.raises(ConversionError, match="config.json"):
        siglip_converter.convert(
            TensorSource(str(tmp_path / "model.safetensors")),
            str(tmp_path / "o"),
            type("Args", (), dict(dtype="float32", overwrite=False))(),
        )
    del sd["encoder.layers.1.mlp.fc2.bias"]
    tiny_hf_siglip_config().save_pretrained(tmp_path)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing \(1\):\s+encoder.layers.1.mlp.fc2.bias"):
        siglip_converter.convert(
            TensorSource(str(tmp_path / "model.safetensors")),
            str(tmp_path / "o"),
            type("Args", (), dict(dtype="float32", overwrite=False))(),
        )


def test_sharded_load_matches_unsharded(tmp_path):
    from flax import nnx

    from sama_jax import sharding

    randomize_norms(SiglipVisionModel(tiny_hf_siglip_config()).eval()).save_pretrained(tmp_path / "hf")
    plain = convert(tmp_path / "hf", tmp_path / "ours")
    mesh = sharding.create_mesh(dict(ici=dict(fsdp=2, tensor=4)))
    sharded = load_siglip(str(tmp_path / "ours"), mesh=mesh)
    kernel = sharded.layers.mlp.fc1.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    x = pixels(4).numpy().transpose(0, 2, 3, 1)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        out = nnx.jit(lambda m, p: m(p))(sharded, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)


def test_image_size_not_a_multiple_of_the_patch(tmp_path):
    # As so400m-patch14-384 (27 * 14 = 378 < 384): the size comes from config.json, and the patch
    # conv drops the remainder; preprocess must resize to 62 here, not to 4 * 14 = 56.
    config = tiny_hf_siglip_config()
    config.image_size = 62
    ref = randomize_norms(SiglipVisionModel(config).eval())
    ref.save_pretrained(tmp_path / "hf")
    model = convert(tmp_path / "hf", tmp_path / "ours")
    assert model.cfg.image_size == 62 and model.cfg.grid_size == 4
    x = torch.rand(2, 3, 62, 62, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected = ref(pixel_values=x).last_hidden_state.numpy()
    err = rel_err(model(x.numpy().transpose(0, 2, 3, 1)), expected)
    assert err < 1e-5, err


def test_so400m_is_recognised_without_config_json(tmp_path):
    full = presets.SIGLIP["wan_14b"]
    d, f = full["hidden_size"], full["intermediate_size"]
    shapes = {
        "embeddings.patch_embedding.weight": (d, 3, 14, 14),
        "embeddings.patch_embedding.bias": (d,),
        "embeddings.position_embedding.weight": (729, d),
        "encoder.layers.0.mlp.fc1.weight": (f, d),
        "encoder.layers.0.self_attn.q_proj.weight": (d, d),
    }
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(tmp_path / "model.safetensors"))
    config = siglip_converter.infer_config(TensorSource(str(tmp_path / "model.safetensors")), "")
    assert (config["image_size"], config["num_heads"], config["patch_size"]) == (384, 16, 14)
