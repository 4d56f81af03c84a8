"""Host data throughput: samples per second per CPU core for 81-frame 480x832 clips (decode + transforms),
and how many host cores keep one accelerator fed at the anchor step times.

    .venv/bin/python benchmarks/data_throughput.py            # ~2 minutes on one core
    .venv/bin/python benchmarks/data_throughput.py --seconds 5 --frames 81 17

What is timed: sama_jax.data.pipeline.prepare_sample on one core (PyAV decode with one thread,
frame sampling, bucket resize + centre-crop with Pillow, motion-alignment pretext, anchors) - the work
one Grain worker process does per sample. Grain workers are separate processes, so the rate scales with
cores until memory bandwidth or I/O limits it; the estimate below assumes linear scaling.

The clips are generated here (a panning textured background with moving shapes and mild noise,
H.264 crf 17, the codec settings of video_io.write_video) and their bitrate is printed: real footage
at a similar bitrate decodes at a similar speed, flat synthetic content would flatter the numbers.

Anchor step times (/work/shared/reference/anchors.md, one H100, batch 1): Wan 1.3B train step with
gradient checkpointing 8.588 s at 81 frames and 0.917 s at 17 frames (the "edit480x17" workload).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sama_jax import resolution  # noqa: E402
from sama_jax.data import pipeline, pretext, video_io  # noqa: E402

ANCHOR_STEP_S = {81: 8.588, 17: 0.917}
HEIGHT, WIDTH = 480, 832


def make_clip(num_frames: int, seed: int) -> np.ndarray:
    """A camera pan over a smooth texture, two moving discs, and sensor-like noise."""
    rng = np.random.default_rng(seed)
    big = rng.integers(0, 256, (HEIGHT // 8 + 8, (WIDTH + 4 * num_frames) // 8 + 8, 3), np.uint8)
    from PIL import Image

    texture = np.asarray(Image.fromarray(big).resize((big.shape[1] * 8, big.shape[0] * 8), Image.BICUBIC))
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    frames = np.empty((num_frames, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(num_frames):
        frame = texture[:HEIGHT, 4 * t : 4 * t + WIDTH].astype(np.int16)
        for k, colour in enumerate(((230, 40, 40), (40, 60, 230))):
            cy, cx = 150 + 100 * k + 40 * np.sin(t / 9 + k), 100 + 7 * t + 200 * k
            frame[(yy - cy) ** 2 + (xx - cx % WIDTH) ** 2 < 60**2] = colour
        frame += rng.integers(-3, 4, frame.shape, dtype=np.int16)
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def rate(fn, seconds: float) -> tuple[float, float, int]:
    """(calls per CPU-second of this process, calls per wall second, calls) after one warm-up call.

    CPU time is the per-core figure: on a shared machine wall time also counts the time other
    processes held the core. Decoding runs with one thread, so all the work is in this process.
    """
    fn()
    count, wall, cpu = 0, time.perf_counter(), time.process_time()
    while count < 2 or time.perf_counter() - wall < seconds:
        fn()
        count += 1
    return count / (time.process_time() - cpu), count / (time.perf_counter() - wall), count


def pipeline_rate(blob: bytes, frames: int, workers: int, seconds: float) -> None:
    """Whole pipeline (Grain worker processes, transfer to the main process, batching), wall rate."""
    import ml_collections

    data = ml_collections.ConfigDict(
        dict(
            num_frames=frames,
            pixels=HEIGHT * WIDTH,
            aspect_ratios=(0.5, 2 / 3, 0.75, 1.0, 4 / 3, 1.5, 2.0),
            size_multiple=32,
            motion_alignment=True,
            worker_count=workers,
            prefetch=1,
        )
    )
    records = [dict(id=f"c{i}", kind="t2v", text="x", target=blob, target_ext=".mp4") for i in range(8)]
    ds = pipeline.build_pipeline(
        data, [(dict(weight=1.0), records)], batch_size=1, seed=0, process_index=0, process_count=1
    )
    it = iter(ds)
    # Untimed: the workers start, and the samples already waiting in their buffers (output buffer,
    # read-ahead thread, the one in hand) would otherwise count as free.
    for _ in range(3 * workers + 1):
        next(it)
    count, wall, cpu = 0, time.perf_counter(), time.process_time()
    while count < 4 or time.perf_counter() - wall < seconds:
        next(it)
        count += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    it.close()
    print(
        f"\nwhole pipeline, {workers} worker processes, {frames}-frame raw clips + motion alignment, "
        f"batch 1: "
        f"{count / wall:.2f} samples/s wall, main process {1000 * cpu / count:.0f} CPU ms/sample "
        f"({count} samples; this machine has {os.cpu_count()} cores shared with other jobs)"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=12.0, help="timing per case")
    parser.add_argument("--frames", type=int, nargs="+", default=[81, 17])
    parser.add_argument(
        "--pipeline-workers",
        type=int,
        default=2,
        help="also run the whole Grain pipeline (raw clips of the most frames + motion "
        "alignment, batch 1) with this many worker processes; 0 skips it",
    )
    args = parser.parse_args(argv)

    buckets = tuple(resolution.training_buckets(HEIGHT * WIDTH, (0.5, 2 / 3, 0.75, 1.0, 4 / 3, 1.5, 2.0), 32))
    tmp = tempfile.mkdtemp(prefix="data_throughput_")
    max_frames = max(args.frames)
    source_path, target_path = os.path.join(tmp, "src.mp4"), os.path.join(tmp, "tgt.mp4")
    t0 = time.perf_counter()
    video_io.write_video(source_path, make_clip(max_frames, 0), fps=16)
    video_io.write_video(target_path, make_clip(max_frames, 1), fps=16)
    mbps = os.path.getsize(source_path) * 8 / (max_frames / 16) / 1e6
    print(
        f"clips: {max_frames} frames {HEIGHT}x{WIDTH} H.264 crf 17, {mbps:.1f} Mbit/s at 16 fps "
        f"(made in {time.perf_counter() - t0:.0f} s); buckets: 480p paper ratios, multiple 32 "
        f"-> {HEIGHT}x{WIDTH} clips land in {resolution.nearest_training_bucket(HEIGHT, WIDTH, buckets)}"
    )
    blob = open(source_path, "rb").read()

    print(
        f"\n{'case':40s} {'frames':>6s} {'samples/s/core':>15s} {'CPU ms/sample':>14s} "
        f"{'wall samples/s':>15s} {'n':>4s}"
    )
    results = {}
    for frames in args.frames:
        base = pipeline.SampleSpec(num_frames=frames, buckets=buckets, seed=0)
        spec_ma = pipeline.SampleSpec(
            num_frames=frames, buckets=buckets, seed=0, pretext=pretext.PretextConfig()
        )
        edit = dict(id="e", kind="video_edit", text="x", source=source_path, target=target_path)
        clip = dict(id="c", kind="t2v", text="x", target=blob, target_ext=".mp4")
        counter = iter(range(10**9))
        cases = [
            ("decode only (PyAV, 1 thread)", lambda: video_io.decode_video(blob, max_frames=frames)),
            ("stage 1 video-edit pair (2 decodes)", lambda: pipeline.prepare_sample(edit, 0, base)),
            (
                "stage 0 raw clip + motion alignment",
                lambda: pipeline.prepare_sample(clip, next(counter), spec_ma),
            ),
        ]
        for name, fn in cases:
            per_s, wall_s, n = rate(fn, args.seconds)
            results[(name, frames)] = per_s
            print(f"{name:40s} {frames:6d} {per_s:15.2f} {1000 / per_s:14.0f} {wall_s:15.2f} {n:4d}")

    image = os.path.join(tmp, "img.png")
    video_io.write_image(image, make_clip(1, 2)[0])
    spec_img = pipeline.SampleSpec(num_frames=1, buckets=buckets, min_frames=1)
    pair = dict(id="i", kind="image_edit", text="x", source=image, target=image)
    per_s, wall_s, n = rate(lambda: pipeline.prepare_sample(pair, 0, spec_img), args.seconds / 3)
    print(f"{'image-edit pair (png)':40s} {1:6d} {per_s:15.2f} {1000 / per_s:14.0f} {wall_s:15.2f} {n:4d}")

    print(
        "\nhost cores to feed one accelerator (batch 1 per device, anchor step times, CPU-time rates, "
        "linear scaling):"
    )
    for frames in args.frames:
        if frames not in ANCHOR_STEP_S:
            continue
        step = ANCHOR_STEP_S[frames]
        for name in ("stage 1 video-edit pair (2 decodes)", "stage 0 raw clip + motion alignment"):
            need = 1.0 / (step * results[(name, frames)])
            print(f"  {frames:3d} frames, step {step:.3f} s, {name}: {need:.2f} cores")
    if args.pipeline_workers > 0:
        pipeline_rate(blob, max_frames, args.pipeline_workers, args.seconds)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
