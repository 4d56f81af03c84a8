import jax
import numpy as np
import pytest
from flax import nnx

from sama_jax import lora as lora_lib
from sama_jax import presets
from sama_jax.models.wan_dit import WanDiT, WanDiTConfig


@pytest.fixture(scope="module")
def model():
    """A tiny DiT with random N(0, 1) parameters (filled by shape: no eager initialisers)."""
    cfg = WanDiTConfig(**presets.DIT["tiny"])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    nnx.replace_by_pure_dict(
        state, jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), nnx.to_pure_dict(state))
    )
    return nnx.merge(graphdef, state)


def flat_params(model):
    state = nnx.state(model, nnx.Param)
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def random_lora(rng, rank=3):
    dim, ffn = presets.DIT["tiny"]["dim"], presets.DIT["tiny"]["ffn_dim"]
    sem = presets.DIT["tiny"]["semantic_dim"]
    shapes = {
        "blocks.1.self_attn.q": (dim, dim),
        "blocks.0.ffn.0": (ffn, dim),
        "blocks.1.ffn.2": (dim, ffn),
        "semantic_head.proj": (sem, dim),
    }
    out = {}
    for module, (o, i) in shapes.items():
        out[f"diffusion_model.{module}.lora_A.default.weight"] = rng.standard_normal((rank, i)).astype(
            np.float32
        )
        out[f"diffusion_model.{module}.lora_B.default.weight"] = rng.standard_normal((o, rank)).astype(
            np.float32
        )
    # diffusers naming for one module, no adapter name
    out["blocks.0.attn2.to_k.lora_A.weight"] = rng.standard_normal((rank, dim)).astype(np.float32)
    out["blocks.0.attn2.to_k.lora_B.weight"] = rng.standard_normal((dim, rank)).astype(np.float32)
    return out


def test_merge_adds_b_times_a_to_exactly_the_named_weights(model, rng):
    before = flat_params(model)
    lora = random_lora(rng)
    merged = lora_lib.merge_lora(model, lora, alpha=0.5)
    after = flat_params(model)
    assert merged == sorted(
        [
            "blocks.1.self_attn.q",
            "blocks.0.ffn.0",
            "blocks.1.ffn.2",
            "semantic_head.proj",
            "blocks.0.cross_attn.k",
        ]
    )
    delta = lambda m, prefix="diffusion_model.", adapter=".default": (
        0.5 * (lora[f"{prefix}{m}.lora_B{adapter}.weight"] @ lora[f"{prefix}{m}.lora_A{adapter}.weight"]).T
    )
    expected = {k: v.copy() for k, v in before.items()}
    expected["blocks.self_attn.q.kernel"][1] += delta("blocks.1.self_attn.q")
    expected["blocks.ffn.fc1.kernel"][0] += delta("blocks.0.ffn.0")
    expected["blocks.ffn.fc2.kernel"][1] += delta("blocks.1.ffn.2")
    expected["semantic_head.proj.kernel"] += delta("semantic_head.proj")
    expected["blocks.cross_attn.k.kernel"][0] += delta("blocks.0.attn2.to_k", "", "")
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert sorted(changed) == sorted(
        [
            "blocks.self_attn.q.kernel",
            "blocks.ffn.fc1.kernel",
            "blocks.ffn.fc2.kernel",
            "semantic_head.proj.kernel",
            "blocks.cross_attn.k.kernel",
        ]
    )
    for k in before:
        np.testing.assert_allclose(after[k], expected[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_unknown_or_broken_keys_are_named_and_nothing_is_changed(model, rng):
    before = flat_params(model)
    lora = random_lora(rng)
    lora["blocks.7.self_attn.q.lora_A.weight"] = np.zeros((3, 64), np.float32)  # tiny has 2 layers
    lora["blocks.7.self_attn.q.lora_B.weight"] = np.zeros((64, 3), np.float32)
    with pytest.raises(lora_lib.LoraError, match=r"not Linear layers.*blocks\.7\.self_attn\.q"):
        lora_lib.merge_lora(model, lora)
    with pytest.raises(lora_lib.LoraError, match=r"not LoRA weights.*alpha"):
        lora_lib.merge_lora(model, {"blocks.0.ffn.0.alpha": np.ones(())})
    with pytest.raises(lora_lib.LoraError, match="without both lora_A and lora_B: .*blocks.0.ffn.0"):
        lora_lib.merge_lora(model, {"blocks.0.ffn.0.lora_A.weight": np.ones((2, 64), np.float32)})
    bad = {
        "blocks.0.ffn.0.lora_A.weight": np.ones((2, 64), np.float32),
        "blocks.0.ffn.0.lora_B.weight": np.ones((64, 2), np.float32),
    }
    with pytest.raises(lora_lib.LoraError, match=r"blocks.0.ffn.0: lora_A \(2, 64\).*\(128, 64\)"):
        lora_lib.merge_lora(model, bad)
    after = flat_params(model)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_read_lora_from_safetensors(tmp_path, rng):
    from safetensors.numpy import save_file

    lora = random_lora(rng)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    read = lora_lib.read_lora(str(tmp_path / "lora.safetensors"))
    assert set(read) == set(lora)
    np.testing.assert_array_equal(
        read["blocks.0.attn2.to_k.lora_A.weight"], lora["blocks.0.attn2.to_k.lora_A.weight"]
    )
