"""Validation loss: SAMA's training loss on held-out data at fixed sigmas, with fixed noise, so the
numbers of different steps (and runs) compare.

config.eval.val_loss: mixture (held-out manifests/shards, as data.mixture), batch_size (global),
batches (how many batches are read once and kept), sigmas (the fixed noise levels, unshifted: the
loss is computed at exactly these sigma values). Yields val_loss/sigma_<s> and val_loss/mean (of
the total loss) and val_loss_fm/mean.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from sama_jax import conditioning, sharding, train_step
from sama_jax.config import ConfigError


class ValLoss:
    def __init__(self, config, *, mesh, rules, encoders, tokenizer):
        from sama_jax.data import pipeline

        self.config, self.mesh, self.rules = config, mesh, rules
        cfg = config.eval.val_loss
        self.sigmas = tuple(float(s) for s in cfg.sigmas)
        if not self.sigmas or not all(0.0 < s <= 1.0 for s in self.sigmas):
            raise ConfigError(f"eval.val_loss.sigmas={cfg.sigmas}: give sigmas in (0, 1]")
        processes = jax.process_count()
        if int(cfg.batch_size) % processes:
            raise ConfigError(f"eval.val_loss.batch_size={cfg.batch_size} is not divisible by the "
                              f"{processes} processes")
        data = pipeline.build_pipeline(
            config.data, pipeline.open_sources(cfg.mixture, root=config.data.root), batch_size=int(cfg.batch_size) // processes,
            seed=int(config.seed), num_epochs=1, worker_count=0,
            anchor_frames=encoders.semantic.num_anchor_frames, text_len=int(config.model.dit.text_len))
        iterator = iter(data)
        self.batches = []
        for _ in range(int(cfg.batches)):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            self.batches.append(sharding.shard_batch(
                conditioning.host_arrays(batch, tokenizer, config), mesh, rules))
        iterator.close()
        if not self.batches:
            raise ConfigError(f"eval.val_loss.mixture gives no batch of {cfg.batch_size} samples")
        self.encoder_graphdef, self.encoder_state = nnx.split(encoders)
        self._loss = None

    def run(self, dit, step: int):
        graphdef, params, rest = nnx.split(dit, nnx.Param, ...)
        if self._loss is None:
            prepare, loss_fn = train_step.make_objective(self.config, graphdef, rest,
                                                         self.encoder_graphdef)
            self._loss = jax.jit(lambda p, e, b, k, s: loss_fn(p, prepare(e, b, k, s))[1])
        key = jax.random.PRNGKey(int(self.config.seed) + 1)
        totals, fms = [], []
        with sharding.use_mesh(self.mesh, self.rules):
            for sigma in self.sigmas:
                metrics = [jax.device_get(self._loss(params, self.encoder_state, batch,
                                                     jax.random.fold_in(key, i), np.float32(sigma)))
                           for i, batch in enumerate(self.batches)]
                total = float(np.mean([m["loss"] for m in metrics]))
                totals.append(total)
                fms.append(float(np.mean([m["loss_fm"] for m in metrics])))
                yield f"val_loss/sigma_{sigma:g}", total
        yield "val_loss/mean", float(np.mean(totals))
        yield "val_loss_fm/mean", float(np.mean(fms))
