"""PyTorch checkpoints (Wan2.1 DiT, SAMA-14B, Wan VAE, umT5-XXL, SigLIP) -> Orbax params checkpoints."""
