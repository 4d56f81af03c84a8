"""Flax NNX models. Loaders are imported lazily so that `import sama_jax.models` stays cheap.

  load_dit(path)            Wan2.1 DiT with SAMA's semantic anchoring (sama_jax.models.wan_dit)
  load_vae(path)            Wan2.1 causal 3D VAE (sama_jax.models.wan_vae)
  load_text_encoder(path)   umT5-XXL encoder (sama_jax.models.umt5)
  load_siglip(path)         SigLIP vision tower (sama_jax.models.siglip)
"""
import importlib

_LAZY = {
    "load_dit": "sama_jax.models.wan_dit",
    "load_vae": "sama_jax.models.wan_vae",
    "load_text_encoder": "sama_jax.models.umt5",
    "load_siglip": "sama_jax.models.siglip",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sama_jax.models' has no attribute {name!r}")
