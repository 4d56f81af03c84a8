"""Cost of the pipeline's metadata pass (sama_jax.data.pipeline.plan_shape), per sample, on one core.

    .venv/bin/python benchmarks/data_metadata_pass.py               # ~1 minute
    .venv/bin/python benchmarks/data_metadata_pass.py --seconds 2 --frames 81

Every process runs the metadata pass over the whole global stream (global batch = per-process batch x
process count samples a step), so its cost per sample times the global batch is what each host pays
per step on top of decoding its own slice. Cases:
  size keys          a manifest record with frames/height/width (sama-make-synthetic writes them):
                     a stat of the file(s) and arithmetic, no read
  t2v probe          no size keys: video_io.video_info on the file (demuxes, decodes nothing)
  shard edit pair    an ArrayRecord record (target size stored at build, the source probed from the
                     record's bytes), including reading the record from the shard
  image pair probe   no size keys: two image headers
and, for scale, the full decode + transforms of the same clip (prepare_sample, what a worker does).
The clip is data_throughput.py's synthetic 480x832 pan (real-footage-like bitrate).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data_throughput import HEIGHT, WIDTH, make_clip  # noqa: E402

from sama_jax import resolution  # noqa: E402
from sama_jax.data import arrayrecord, manifest, pipeline, shard_builder, video_io  # noqa: E402


def per_call_ms(fn, seconds: float) -> tuple[float, int]:
    """CPU ms of this process per call (after a warm-up call), and the number of calls."""
    fn()
    count, wall, cpu = 0, time.perf_counter(), time.process_time()
    while count < 3 or time.perf_counter() - wall < seconds:
        fn()
        count += 1
    return 1000 * (time.process_time() - cpu) / count, count


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="timing per case")
    parser.add_argument("--frames", type=int, default=81)
    args = parser.parse_args(argv)
    buckets = resolution.training_buckets(HEIGHT * WIDTH, (0.5, 2 / 3, 0.75, 1.0, 4 / 3, 1.5, 2.0), 32)
    spec = pipeline.SampleSpec(num_frames=args.frames, buckets=tuple(buckets), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(args.frames, seed=0)
        video_io.write_video(os.path.join(tmp, "a.mp4"), clip, fps=16)
        video_io.write_video(os.path.join(tmp, "b.mp4"), clip[:, ::-1], fps=16)
        video_io.write_image(os.path.join(tmp, "a.png"), clip[0])
        video_io.write_image(os.path.join(tmp, "b.png"), clip[1])
        mb = os.path.getsize(os.path.join(tmp, "a.mp4")) / 2**20
        size = dict(frames=args.frames, height=HEIGHT, width=WIDTH)
        clip_record = dict(id="c", kind="t2v", target=os.path.join(tmp, "a.mp4"), text="x")
        pair = dict(id="p", kind="video_edit", source="a.mp4", target="b.mp4", text="x")
        images = dict(
            id="i",
            kind="image_edit",
            source=os.path.join(tmp, "a.png"),
            target=os.path.join(tmp, "b.png"),
            text="x",
        )
        manifest.write_manifest(os.path.join(tmp, "m.jsonl"), [pair])
        shard_builder.build_shards(os.path.join(tmp, "m.jsonl"), os.path.join(tmp, "shards"))
        shard = arrayrecord.ShardSource(os.path.join(tmp, "shards"))
        assert pipeline.plan_shape(shard[0], spec) == pipeline.plan_shape(dict(clip_record, **size), spec)

        cases = [
            ("size keys (manifest record)", lambda: pipeline.plan_shape(dict(clip_record, **size), spec)),
            ("t2v probe (video_info of the file)", lambda: pipeline.plan_shape(clip_record, spec)),
            ("shard edit pair (read + probe source)", lambda: pipeline.plan_shape(shard[0], spec)),
            ("image pair probe (2 headers)", lambda: pipeline.plan_shape(images, spec)),
        ]
        print(f"{args.frames}-frame {HEIGHT}x{WIDTH} H.264 clip of {mb:.1f} MiB; buckets {len(buckets)}")
        print(f"{'case':42s} {'CPU ms/sample':>14s} {'n':>6s}  per step at global batch 64 / 512")
        for name, fn in cases:
            ms, n = per_call_ms(fn, args.seconds)
            print(f"{name:42s} {ms:14.3f} {n:6d}  {64 * ms / 1000:.3f} s / {512 * ms / 1000:.3f} s")
        ms, n = per_call_ms(lambda: pipeline.prepare_sample(clip_record, 0, spec), args.seconds)
        print(f"{'for scale: full decode + transforms (t2v)':42s} {ms:14.1f} {n:6d}")


if __name__ == "__main__":
    main()
