"""Peak host memory and time of the DiT converter on a generated Wan2.1-14B-shaped checkpoint.

    .venv/bin/python benchmarks/convert_dit_rss.py --layers 4 [--dtype bfloat16] [--workdir /tmp/x]

Writes a bf16 checkpoint in the official sharded layout (one shard per block + one for the rest,
with .safetensors.index.json, as the released 14B files) with the 14B widths (dim 5120, ffn 13824,
SAMA keys included) and `--layers` blocks, then converts it in a fresh subprocess and prints that
process's peak RSS (ru_maxrss) and wall time. Both the generator and the converter run as separate
processes so neither's memory counts toward the other's peak. The full 40-layer model is not
generated: peak memory is set by the largest stacked parameter (blocks.ffn.fc1.kernel, layers x
5120 x 13824), which this script reports for 40 layers by extrapolation.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, FFN, TEXT, FREQ, SEM, HIDDEN = 5120, 13824, 4096, 256, 1152, 1024


def _block_shapes(i):
    shapes = {f"blocks.{i}.modulation": (1, 6, DIM), f"blocks.{i}.norm3.weight": (DIM,),
              f"blocks.{i}.norm3.bias": (DIM,), f"blocks.{i}.ffn.0.weight": (FFN, DIM),
              f"blocks.{i}.ffn.0.bias": (FFN,), f"blocks.{i}.ffn.2.weight": (DIM, FFN),
              f"blocks.{i}.ffn.2.bias": (DIM,)}
    for attn in ("self_attn", "cross_attn"):
        for name in "qkvo":
            shapes[f"blocks.{i}.{attn}.{name}.weight"] = (DIM, DIM)
            shapes[f"blocks.{i}.{attn}.{name}.bias"] = (DIM,)
        shapes[f"blocks.{i}.{attn}.norm_q.weight"] = (DIM,)
        shapes[f"blocks.{i}.{attn}.norm_k.weight"] = (DIM,)
    return shapes


def _top_shapes():
    lin = lambda name, i, o: {f"{name}.weight": (o, i), f"{name}.bias": (o,)}
    shapes = {"patch_embedding.weight": (DIM, 16, 1, 2, 2), "patch_embedding.bias": (DIM,),
              "head.modulation": (1, 2, DIM), "segment_embedding.weight": (3, DIM),
              "siglip_feat_mlp.norm.weight": (SEM,), "siglip_feat_mlp.norm.bias": (SEM,),
              "semantic_head.norm.weight": (DIM,), "semantic_head.norm.bias": (DIM,)}
    for args in (("text_embedding.0", TEXT, DIM), ("text_embedding.2", DIM, DIM),
                 ("time_embedding.0", FREQ, DIM), ("time_embedding.2", DIM, DIM),
                 ("time_projection.1", DIM, 6 * DIM), ("head.head", DIM, 64),
                 ("siglip_feat_mlp.fc1", SEM, HIDDEN), ("siglip_feat_mlp.fc2", HIDDEN, DIM),
                 ("semantic_head.proj", DIM, SEM)):
        shapes.update(lin(*args))
    return shapes


def generate(folder: str, layers: int) -> None:
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    groups = [_top_shapes()] + [_block_shapes(i) for i in range(layers)]
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    for n, shapes in enumerate(groups):
        name = f"diffusion_pytorch_model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
        save_file(tensors, os.path.join(folder, name))
        weight_map.update({k: name for k in tensors})
        del tensors
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _sample_rss(peaks: dict, stop) -> None:
    """Peak anonymous vs file-backed resident memory: mmapped safetensors pages count in RSS but
    are page cache the kernel can drop, unlike the converter's own arrays (anonymous)."""
    while not stop.is_set():
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) / 2**20)
        stop.wait(0.05)


def convert(folder: str, output: str, dtype: str) -> None:
    import resource
    import threading

    from tools.convert_wan_weights import cli

    peaks, stop = {}, threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(peaks, stop), daemon=True)
    sampler.start()
    start = time.time()
    code = cli.main([folder, output, "--kind", "dit", "--dtype", dtype, "--overwrite"])
    seconds = time.time() - start
    stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB
    print(json.dumps(dict(exit=code, seconds=round(seconds, 1), peak_rss_gib=round(peak, 3),
                          peak_anon_gib=round(peaks.get("RssAnon", 0), 3),
                          peak_file_gib=round(peaks.get("RssFile", 0), 3))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--workdir", default=None,
                        help="keep the generated checkpoint here (reused by later runs)")
    parser.add_argument("--_role", choices=("generate", "convert"), help=argparse.SUPPRESS)
    parser.add_argument("--_src", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._role == "generate":
        return generate(args._src, args.layers)
    if args._role == "convert":
        return convert(args._src, args._out, args.dtype)

    workdir = args.workdir or tempfile.mkdtemp(prefix="convert_dit_rss_")
    src, out = os.path.join(workdir, "wan14b_shaped"), os.path.join(workdir, "converted")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    me = [sys.executable, os.path.abspath(__file__), "--layers", str(args.layers), "--dtype", args.dtype]
    try:
        start = time.time()
        if not os.path.exists(os.path.join(src, "diffusion_pytorch_model.safetensors.index.json")):
            subprocess.run(me + ["--_role", "generate", "--_src", src], check=True, env=env)
        size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)) / 2**30
        print(f"{args.layers}-layer 14B-shaped checkpoint: {size:.2f} GiB bf16 "
              f"in {time.time() - start:.0f}s")
        result = subprocess.run(me + ["--_role", "convert", "--_src", src, "--_out", out],
                                check=True, env=env, capture_output=True, text=True)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        stacked = lambda layers, nbytes: layers * DIM * FFN * nbytes / 2**30
        nbytes = 2 if args.dtype == "bfloat16" else 4
        print(f"convert --dtype {args.dtype}: {figures['seconds']}s, peak RSS (ru_maxrss) "
              f"{figures['peak_rss_gib']} GiB; sampled peaks: anonymous {figures['peak_anon_gib']} GiB, "
              f"file-backed (mmapped safetensors) {figures['peak_file_gib']} GiB (exit {figures['exit']})")
        print(f"largest stacked parameter (ffn.0): {stacked(args.layers, nbytes):.2f} GiB at "
              f"{args.layers} layers, {stacked(40, nbytes):.2f} GiB at 40 layers (full 14B)")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
