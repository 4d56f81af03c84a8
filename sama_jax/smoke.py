"""sama-smoke: SAMA's training objective end to end on the embedded default, sharded, on a CPU.

  sama-smoke --config=configs/stage1_sft.py:tiny --cpu_devices=8 [--steps=3] [--config.x=...]

The smallest real run of the whole stack until the train loop exists: it generates the synthetic
editing dataset and a tokenizer for it if `data/synthetic` is absent, builds the mesh, builds the
frozen encoders (Wan VAE, umT5, SigLIP) and the SAMA DiT of the config's preset with random
weights, shards them, reads batches through the Grain pipeline and, for each, encodes the source
and target videos, the instruction and the target's anchor frames, noises the target latents and
the semantic tokens with one shifted sigma per sample, runs the DiT on [source | semantic | target]
and prints SAMA's loss and the norm of its gradient with respect to the DiT parameters.
No update is applied: this checks that the pieces compose, shard and differentiate.
"""
from __future__ import annotations

import glob
import os
import sys
import time


def _take_flag(argv: list[str], name: str, default: str | None) -> tuple[str | None, list[str]]:
    prefix = f"--{name}="
    value = next((a[len(prefix):] for a in argv if a.startswith(prefix)), default)
    return value, [a for a in argv if not a.startswith(prefix)]


def prepare_data(data_dir: str, text_vocab_size: int) -> str:
    """Synthetic dataset + a tokenizer trained on its texts, made once; returns the tokenizer dir."""
    from sama_jax import text
    from sama_jax.data import manifest, pretext, synthetic

    tokenizer_dir = os.path.join(data_dir, "tokenizer")
    if not os.path.exists(os.path.join(data_dir, "video_edits.jsonl")):
        print(f"generating the synthetic dataset in {data_dir}")
        synthetic.generate(data_dir, seed=0, video_edits=32, image_edits=32, clips=32, frames=9,
                           height=64, width=64)
    if not os.path.isdir(tokenizer_dir):
        texts = [s["text"] for path in sorted(glob.glob(os.path.join(data_dir, "*.jsonl")))
                 for s in manifest.read_manifest(path)]
        texts += list(pretext.DEFAULT_TOKENS.values()) + ["[Video edit]"]
        text.build_sentencepiece_tokenizer(texts, tokenizer_dir, vocab_size=text_vocab_size)
    return tokenizer_dir


def main(argv: list[str] | None = None) -> int:
    from sama_jax.config import load_config, simulate_cpu_devices

    argv = simulate_cpu_devices(sys.argv[1:] if argv is None else argv)
    steps, argv = _take_flag(argv, "steps", "3")
    data_dir, argv = _take_flag(argv, "data_dir", "data/synthetic")

    import jax
    import numpy as np
    import optax
    from flax import nnx

    from sama_jax import flow_matching, semantic, sharding, text
    from sama_jax.data import pipeline, transforms
    from sama_jax.models import siglip, umt5, wan_dit, wan_vae

    config, rest = load_config(argv)
    if rest:
        raise SystemExit(f"unknown arguments: {rest}")
    model_cfg = config.model
    tokenizer = text.load_tokenizer(prepare_data(data_dir, min(model_cfg.text_encoder.vocab_size, 400)))

    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.axis_rules(config.sharding_rules)
    print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")

    rngs = nnx.Rngs(config.seed)
    dit = wan_dit.WanDiT(wan_dit.WanDiTConfig.from_sections(model_cfg.dit, config.precision), rngs=rngs)
    vae = wan_vae.WanVAE(wan_vae.config_from_dict(model_cfg.vae.to_dict()), rngs=rngs)
    text_encoder = umt5.UMT5Encoder(umt5.config_from_dict(model_cfg.text_encoder.to_dict()), rngs=rngs)
    vision = siglip.SiglipVisionModel(siglip.config_from_dict(model_cfg.siglip.to_dict()), rngs=rngs)
    for model in (dit, vae, text_encoder, vision):
        sharding.shard_module(model, mesh, rules)
    semantic_cfg = semantic.SemanticConfig(**model_cfg.semantic)
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(dit, nnx.Param)))
    print(f"SAMA DiT '{model_cfg.preset}': {num_params:,} parameters")

    sources = pipeline.open_sources(config.data.mixture)
    data = pipeline.build_pipeline(config.data, sources, batch_size=config.train.batch_size,
                                   seed=config.seed, anchor_frames=semantic_cfg.num_anchor_frames,
                                   text_len=model_cfg.dit.text_len)
    shift, semantic_weight = config.train.timestep_shift, config.train.semantic_loss_weight

    @nnx.jit
    def loss_and_grad_norm(dit, vae, text_encoder, vision, batch, key):
        source = vae.encode(transforms.to_model_range(batch["source"]))
        x0 = vae.encode(transforms.to_model_range(batch["target"]))
        context = text.encode(text_encoder, batch["ids"], batch["mask"])
        semantic_x0 = semantic.semantic_tokens_from_anchors(vision, batch["anchors"], semantic_cfg)
        k_sigma, k_noise, k_semantic = jax.random.split(key, 3)
        sigma = flow_matching.sample_sigma(k_sigma, x0.shape[0], shift)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        semantic_noise = jax.random.normal(k_semantic, semantic_x0.shape, semantic_x0.dtype)
        x_t = flow_matching.add_noise(x0, noise, sigma)
        semantic_t = flow_matching.add_noise(semantic_x0, semantic_noise, sigma)

        def loss_fn(dit):
            velocity, semantic_velocity = dit(x_t, flow_matching.NUM_TRAIN_TIMESTEPS * sigma, context,
                                              source_latents=source, semantic_tokens=semantic_t)
            return flow_matching.sama_loss(velocity, noise, x0, semantic_velocity, semantic_noise,
                                           semantic_x0, semantic_weight, valid=batch["valid"])

        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(dit)
        return dict(metrics, grad_norm=optax.global_norm(grads))

    key = jax.random.key(config.seed)
    iterator = iter(data)
    for step in range(int(steps)):
        batch = next(iterator)
        ids, mask = text.tokenize(tokenizer, list(batch["text"]), model_cfg.dit.text_len)
        arrays = {"source": batch["source"], "target": batch["target"], "anchors": batch["anchors"],
                  "ids": ids, "mask": mask, "valid": batch["valid"]}
        start = time.time()
        with sharding.use_mesh(mesh, rules):
            metrics = loss_and_grad_norm(dit, vae, text_encoder, vision,
                                         sharding.shard_batch(arrays, mesh, rules),
                                         jax.random.fold_in(key, step))
        metrics = {k: float(v) for k, v in metrics.items()}
        if not all(np.isfinite(list(metrics.values()))):
            print(f"step {step}: non-finite metrics {metrics}")
            return 1
        print(f"step {step}: {batch['kind'][0]} batch {tuple(batch['target'].shape)} "
              + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
              + f" ({time.time() - start:.1f}s)")
    print(f"skipped samples: {iterator.skip_summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
