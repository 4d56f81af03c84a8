"""Helpers shared by the data tests (not a test module): flat test videos and batch comparisons.

Flat frames whose grey level encodes the frame index: H.264 keeps flat frames within a level or two,
so frame sampling can be checked through the codec.
"""

import os

import ml_collections
import numpy as np


def level(t):
    return 10 + 12 * t


def flat_video(values, h, w):
    return np.stack([np.full((h, w, 3), v, np.uint8) for v in values])


def take(ds, n, state=None):
    """The first n batches of a fresh iterator (set to `state` first when given), and the iterator."""
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    batches = [next(it) for _ in range(n)]
    return batches, it


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def tensorboard_events(logdir):
    """{tag: {step: value}} of the TensorBoard event files in logdir: scalars as floats, images as
    (H, W, C) uint8 arrays decoded from their PNGs (what TensorBoard itself would show)."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    events = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["tensors"]:
        for event in events.Tensors(tag):
            value = tensor_util.make_ndarray(event.tensor_proto)
            if value.dtype == object:  # an image summary: [width, height, png, ...]
                value = np.asarray(Image.open(io.BytesIO(value[2])))
            else:
                value = float(value)
            out.setdefault(tag, {})[event.step] = value
    return out


def data_config(**overrides):
    """A small config.data section for pipeline tests (5 frames, 64x64 budget, no pretext, no workers);
    each test file overrides what it exercises."""
    cfg = dict(
        num_frames=5,
        fps=8.0,
        min_frames=5,
        pixels=64 * 64,
        aspect_ratios=(0.5, 1.0, 2.0),
        size_multiple=16,
        motion_alignment=False,
        worker_count=0,
        prefetch=2,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def synthetic_samples(root, seed: int, video_edits: int, image_edits: int, clips: int, frames, height, width):
    """Generated samples of all three kinds under root (sama_jax.data.synthetic, clips at 8 fps),
    as one list of manifest records: video edits, then image edits, then clips."""
    from sama_jax.data import manifest, synthetic

    paths = synthetic.generate(
        str(root),
        seed=seed,
        video_edits=video_edits,
        image_edits=image_edits,
        clips=clips,
        frames=frames,
        height=height,
        width=width,
        fps=8,
    )
    return [
        s for name in ("video_edits", "image_edits", "clips") for s in manifest.read_manifest(paths[name])
    ]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_train_args(steps: int) -> list[str]:
    """sama-train's arguments for the tests' short tiny runs: image edits of the tiny dataset at
    32x32, no evaluators, a checkpoint and a log line every 2 steps."""
    return [
        f"--config={REPO}/configs/stage1_sft.py:tiny",
        "--config.data.mixture=[{'kind': 'image_edit', 'manifest': 'data/synthetic/image_edits.jsonl', "
        "'weight': 1.0}]",
        "--config.data.pixels=1024",
        "--config.eval.evaluators=()",
        f"--config.train.steps={steps}",
        "--config.checkpoint.every_steps=2",
        "--config.train.log_every=2",
    ]


def command_environ() -> dict:
    """The environment of a command a test starts: the test run's compilation cache and compile
    flags (conftest), without its device count (the command sets its own with --cpu-devices)."""
    flags = os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", "")
    return dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")


def link_tiny_dataset(tiny_dataset: str, cwd) -> None:
    """cwd/data -> the shared tiny dataset (conftest's tiny_dataset fixture): the tiny preset finds
    data/synthetic there and generates nothing. Read only."""
    os.symlink(tiny_dataset, os.path.join(cwd, "data"))
