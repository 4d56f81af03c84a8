"""sama-fit-vae: fit a small Wan VAE on a dataset's own frames, for the embedded demo.

    sama-fit-vae --config=configs/stage1_sft.py:demo --out runs/demo/vae [--steps 800] [--cpu-devices=8]

SAMA trains on frozen Wan VAE latents. The demo's VAE is not the released one (whose weights are
127M parameters and are not downloaded here), and a randomly initialised VAE cannot reconstruct
frames, so an edit decoded through it would score nothing. This fits the config's VAE (the same Wan
VAE module, at the preset's width) as a plain autoencoder (L1 + L2 reconstruction of the posterior
mean): first on single frames (the causal VAE encodes a video's first frame alone, at a fifth of a
clip's cost), then on clips for the last --clip-fraction of the steps (the temporal layers). It then
measures the per-channel mean and std of its latents and stores them as the checkpoint's
latents_mean / latents_std, so normalised latents are ~N(0, 1) as Wan's are. The result is an
ordinary params checkpoint that `load_vae` (and model.checkpoints.vae) reads; fit.json records the
reconstruction PSNR of clips it did not train on, per frame. Progress lines time the steps after
each phase's first (which compiles), so the ETA leaves compilation out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from sama_jax import cli, interrupts


def training_clips(config, num_frames: int, limit: int = 1024) -> np.ndarray:
    """(N, num_frames, H, W, 3) uint8 clips of the mixture's video sources (every window of
    num_frames consecutive frames, whole images repeated), read through the data pipeline's
    per-sample decode so sizes and crops are the training ones."""
    import dataclasses as dc

    from sama_jax.data import pipeline

    spec = dc.replace(pipeline.SampleSpec.from_config(config.data, seed=int(config.seed)), pretext=None)
    clips = []
    for _, source in pipeline.open_sources(config.data.mixture, root=config.data.root):
        for i in range(min(len(source), limit)):
            try:
                sample = pipeline.prepare_sample(source[i], i, spec)
            except Exception:  # noqa: BLE001 - the pipeline counts bad samples; here they are simply not used
                continue
            for field in ("target", "source"):
                video = sample[field]
                if video.shape[0] == 1:
                    video = np.repeat(video, num_frames, axis=0)
                if video.shape[0] >= num_frames and video.shape[1:] == sample["target"].shape[1:]:
                    clips.append(video[:num_frames])
    if not clips:
        raise ValueError("sama-fit-vae: the data mixture gave no usable clips")
    shapes = {c.shape for c in clips}
    keep = max(shapes, key=lambda s: sum(c.shape == s for c in clips))
    return np.stack([c for c in clips if c.shape == keep])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def fit(
    config,
    out: str,
    steps: int = 800,
    batch_size: int = 16,
    clip_batch_size: int = 4,
    clip_fraction: float = 0.2,
    lr: float = 1e-3,
    seed: int = 0,
    log=lambda line: print(line, flush=True),
) -> dict:
    """Fits, calibrates and saves the VAE of config.model.vae; returns {psnr, seconds, ...}.

    Two phases on one optimizer and schedule: single frames first (batch_size of them per step),
    then whole clips (clip_batch_size per step) for the last clip_fraction of the steps. The causal
    Wan VAE encodes a video's first frame alone, so the frame phase fits every spatial layer at a
    fifth of a clip's cost; the clip phase then fits the temporal layers (frames 1..4 of each
    latent) and adapts the rest to them."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from sama_jax import params_io, progress
    from sama_jax.models import wan_vae

    start = time.time()
    num_frames = int(config.data.num_frames)
    clips = training_clips(config, num_frames)
    held_out = clips[: max(1, min(len(clips) // 8, 64))]
    train = clips[len(held_out) :] if len(clips) > len(held_out) else clips
    frames = train.reshape((-1, 1) + train.shape[2:])
    cfg = wan_vae.WanVAEConfig.from_config(
        config.model.vae, dict(compute_dtype="float32", param_dtype="float32")
    )
    vae = wan_vae.WanVAE(cfg, rngs=nnx.Rngs(seed))
    warmup = min(50, max(1, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), 0.05 * lr)
    optimizer = nnx.Optimizer(vae, optax.adam(schedule), wrt=nnx.Param)

    def reconstruct(vae, video):
        # Whole clips, not the cached chunk loop: the same function (the chunked path equals it to
        # ~1e-6), and a far smaller program to differentiate and compile.
        x = video.astype(jnp.float32) * (2.0 / 255.0) - 1.0
        mu = vae.encode_mean(x, chunked=False)
        mean, std = vae.latent_stats()
        return vae.decode_unclamped((mu - mean) / std, chunked=False), x, mu

    @nnx.jit
    def train_step(vae, optimizer, video):
        def loss_fn(vae):
            y, x, mu = reconstruct(vae, video)
            # A small pull on the latents keeps their scale bounded (a plain autoencoder has no KL).
            return jnp.mean(jnp.abs(y - x)) + jnp.mean(jnp.square(y - x)) + 1e-4 * jnp.mean(mu**2)

        loss, grads = nnx.value_and_grad(loss_fn)(vae)
        optimizer.update(vae, grads)
        return loss

    @nnx.jit
    def decode_mean(vae, video):
        y, _, mu = reconstruct(vae, video)
        return jnp.clip((y + 1.0) * 127.5, 0, 255), mu

    rng = np.random.default_rng(seed)
    clip_steps = min(steps, round(steps * clip_fraction)) if num_frames > 1 else 0
    phases = [
        ("frames", frames, batch_size, steps - clip_steps),
        ("clips", train, clip_batch_size, clip_steps),
    ]
    step = 0
    # Ctrl-C / SIGTERM: the step in flight finishes and the fit stops without writing --out (a
    # half-fitted VAE is no result; whatever --out held before stays as it was).
    with interrupts.StopRequest("sama-fit-vae", "stopping after this step; nothing is written") as stop:
        for name, pool, size, count in phases:
            timer = PhaseTimer(count)
            for _ in range(count):
                if stop.requested:
                    raise interrupts.Stopped(
                        f"sama-fit-vae: {stop.name} at step {step} of {steps}; nothing written to {out}",
                        stop.exit_code,
                    )
                loss = train_step(vae, optimizer, jnp.asarray(pool[rng.integers(0, len(pool), size)]))
                step += 1
                per_step = timer.tick(lambda: float(loss))
                if per_step == 0.0:
                    log(f"sama-fit-vae: {name} step 1/{count} done (it compiled), loss {float(loss):.4f}")
                elif per_step is not None:
                    details = f"{per_step:.2f} s/step, loss {float(loss):.4f}"
                    log(
                        "sama-fit-vae: "
                        + progress.step_line(timer.done, count, per_step, details, what=f"{name} step")
                    )

    recon, mus = [], []
    # Scored and calibrated on the held-out clips and as many training clips (not all: on a CPU a
    # pass over thousands of clips costs minutes and moves the statistics little).
    measured = clips[: 2 * len(held_out)]
    for i in range(0, len(measured), batch_size):
        batch = measured[i : i + batch_size]
        # The last batch is padded to the others' size: one compiled program for every batch.
        padded = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), axis=0)])
        out_frames, mu = decode_mean(vae, jnp.asarray(padded))
        recon.append(np.asarray(out_frames)[: len(batch)])
        mus.append(np.asarray(mu)[: len(batch)].reshape(-1, cfg.z_dim))
    mus = np.concatenate(mus)
    recon = np.concatenate(recon).round().astype(np.uint8)
    calibrated = dataclasses.replace(
        cfg,
        latents_mean=tuple(float(m) for m in mus.mean(0)),
        latents_std=tuple(float(s) + 1e-6 for s in mus.std(0)),
    )
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(vae, nnx.Param)))
    architecture = {
        k: v for k, v in dataclasses.asdict(calibrated).items() if k not in params_io.PRECISION_KEYS
    }
    params_io.save_params(out, params, wan_vae.KIND, architecture, overwrite=True)
    held = recon[: len(held_out)]
    report = dict(
        psnr_train=psnr(recon[len(held_out) :], measured[len(held_out) :])
        if len(measured) > len(held_out)
        else None,
        psnr_held_out=psnr(held, held_out),
        psnr_held_out_per_frame=[psnr(held[:, t], held_out[:, t]) for t in range(held_out.shape[1])],
        clips=len(clips),
        steps=steps,
        clip_steps=clip_steps,
        frames=num_frames,
        size=list(clips.shape[2:4]),
        seconds=round(time.time() - start, 1),
    )
    with open(os.path.join(out, "fit.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


class PhaseTimer:
    """When to report, and seconds per step timed from the end of the first step: that step
    compiles (seconds to minutes on a CPU), so it stays out of the rate and the ETA."""

    def __init__(self, total: int, every: float = 10.0):
        self.total, self.every, self.done = total, every, 0
        self.first_end = self.last = None

    def tick(self, sync) -> float | None:
        """One more step done: -> seconds per step when a line is due (0.0 after the first step,
        which compiled), else None. `sync` waits for the step (device work is asynchronous)."""
        self.done += 1
        if self.first_end is None:
            sync()
            self.first_end = self.last = time.perf_counter()
            return 0.0
        if time.perf_counter() - self.last < self.every and self.done < self.total:
            return None
        sync()
        self.last = time.perf_counter()
        return (self.last - self.first_end) / (self.done - 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sama-fit-vae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output params checkpoint directory")
    parser.add_argument("--steps", type=int, default=800, help="frame steps, then clip steps")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per step (frame phase)")
    parser.add_argument("--clip-batch-size", type=int, default=4, help="clips per step (clip phase)")
    parser.add_argument(
        "--clip-fraction", type=float, default=0.2, help="the last fraction of the steps, on clips"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    return parser


def main(argv: list[str] | None = None) -> int:
    def run(config, args):
        try:
            report = fit(
                config,
                args.out,
                steps=args.steps,
                batch_size=args.batch_size,
                clip_batch_size=args.clip_batch_size,
                clip_fraction=args.clip_fraction,
                lr=args.lr,
                seed=int(config.seed),
            )
        except interrupts.Stopped as stopped:
            print(stopped, file=sys.stderr)
            return stopped.exit_code
        frames = ", ".join(f"{p:.1f}" for p in report["psnr_held_out_per_frame"])
        print(
            f"sama-fit-vae: wrote {args.out}: reconstruction PSNR {report['psnr_held_out']:.2f} dB "
            f"on held-out clips (per frame: {frames}), {report['seconds']}s"
        )
        return 0

    return cli.run("sama-fit-vae", lambda: run(*cli.parse(build_parser(), argv)))


if __name__ == "__main__":
    sys.exit(main())
