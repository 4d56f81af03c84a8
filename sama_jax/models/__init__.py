"""Flax NNX models, one modeling file each; every loader has the signature
`load_x(path, *, mesh=None, rules=None, precision=None)` over a checkpoint from convert-wan-weights.

  load_dit            Wan2.1 DiT with SAMA's semantic anchoring (wan_dit)
  load_vae            Wan2.1 causal 3D VAE (wan_vae)
  load_text_encoder   umT5-XXL encoder (umt5)
  load_siglip         SigLIP vision tower (siglip)
"""

from sama_jax.models.siglip import load_siglip
from sama_jax.models.umt5 import load_text_encoder
from sama_jax.models.wan_dit import load_dit
from sama_jax.models.wan_vae import load_vae

__all__ = ["load_dit", "load_siglip", "load_text_encoder", "load_vae"]
