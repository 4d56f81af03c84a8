"""Merges a LoRA in the released format into a WanDiT's parameters: W <- W + alpha * B @ A.

    lora = read_lora("sama_lora.safetensors")      # {official key: float32 array}
    merged = merge_lora(model, lora, alpha=1.0)    # names of the merged modules

Keys as DiffSynth's GeneralLoRALoader reads them (the released --lora-path, alpha 1.0):
<module>.lora_A[.<adapter>].weight (r, in) and <module>.lora_B[.<adapter>].weight (out, r), with an
optional 'diffusion_model.' (or 'model.diffusion_model.' / 'pipe.dit.') prefix; diffusers module
names are renamed to the official ones. <module> is an official Wan/SAMA Linear (blocks.N.self_attn.q,
blocks.N.ffn.0, text_embedding.0, semantic_head.proj, ...), mapped to our parameter tree through the
DiT's name table (sama_jax/models/wan_dit_params.py), which the converter reads too, so the two never disagree. Unlike the released
loader, which skips what it does not recognise, a key that names no Linear of the model, an A
without its B, or a shape mismatch is an error naming the keys.
"""

from __future__ import annotations

import re
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sama_jax.models import wan_dit_params as dit_table
from sama_jax.tensor_source import TensorSource, strip_prefix

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


class LoraError(ValueError):
    """A LoRA file that does not fit the model; the message names the keys."""


def read_lora(path: str) -> dict[str, np.ndarray]:
    """All tensors of a LoRA file (safetensors or a PyTorch pickle) as float32 numpy arrays."""
    source = TensorSource(path)
    return {key: np.asarray(source.get(key), np.float32) for key in source.keys()}


def linear_targets(num_layers: int) -> dict[str, tuple[str, int | None]]:
    """Official Linear module name -> (our kernel path 'a.b.kernel', layer index or None)."""
    targets = {}
    for ours, official, how in dit_table.TOP_PARAMS + dit_table.SAMA_PARAMS:
        if how == "linear":
            targets[official[: -len(".weight")]] = (ours, None)
    for ours, template, how in dit_table.BLOCK_PARAMS:
        if how == "linear":
            for i in range(num_layers):
                targets[template.format(i=i)[: -len(".weight")]] = (ours, i)
    return targets


def _pairs(lora: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """module -> {"A": (r, in), "B": (out, r)}; raises naming keys that are not LoRA weights."""
    bare = strip_prefix(lora.keys(), dit_table.PREFIXES)
    pairs, foreign = defaultdict(dict), []
    for name, key in bare.items():
        match = _KEY.match(name)
        if not match:
            foreign.append(key)
            continue
        module = dit_table.rename(match["module"], to_diffusers=False)
        if match["side"] in pairs[module]:
            raise LoraError(
                f"LoRA has two {match['side']} matrices for {module} (several adapters?): "
                f"keep one adapter's keys"
            )
        pairs[module][match["side"]] = lora[key]
    if foreign:
        raise LoraError(
            f"{len(foreign)} keys are not LoRA weights (<module>.lora_A/lora_B[.name].weight): "
            f"{sorted(foreign)[:8]}"
        )
    unpaired = sorted(m for m, p in pairs.items() if len(p) != 2)
    if unpaired:
        raise LoraError(f"LoRA modules without both lora_A and lora_B: {unpaired[:8]}")
    return dict(pairs)


@jax.jit
def _add(kernel, delta):
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


@jax.jit
def _add_layer(kernel, layer, delta):
    return kernel.at[layer].set((kernel[layer].astype(jnp.float32) + delta).astype(kernel.dtype))


def merge_lora(model, lora: dict[str, np.ndarray], alpha: float = 1.0) -> list[str]:
    """Adds alpha * (B @ A) to each named Linear of `model` (a WanDiT), in place (sharded params keep
    their sharding); returns the merged module names. Validates every key before changing anything."""
    pairs = _pairs(lora)
    targets = linear_targets(model.cfg.num_layers)
    unknown = sorted(m for m in pairs if m not in targets)
    if unknown:
        raise LoraError(
            f"{len(unknown)} LoRA modules are not Linear layers of this DiT "
            f"({model.cfg.num_layers} layers): {unknown[:8]}"
        )
    params = nnx.state(model, nnx.Param)
    flat = {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(params)}
    updates = []
    for module, pair in pairs.items():
        ours, layer = targets[module]
        var = flat[ours]
        kernel_shape = var.get_value().shape if layer is None else var.get_value().shape[1:]
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (a.shape[1], b.shape[0]) != kernel_shape:
            raise LoraError(
                f"{module}: lora_A {a.shape} / lora_B {b.shape} do not fit its weight "
                f"(out, in) = {kernel_shape[::-1]}"
            )
        updates.append((module, var, layer, (alpha * (b.astype(np.float64) @ a.astype(np.float64))).T))
    for _, var, layer, delta in updates:
        delta = jnp.asarray(delta, jnp.float32)
        value = var.get_value()
        var.set_value(_add(value, delta) if layer is None else _add_layer(value, layer, delta))
    nnx.update(model, params)
    return sorted(m for m, *_ in updates)
