"""Peak host memory and time of the DiT (or umT5) converter on a generated full-width checkpoint.

    .venv/bin/python benchmarks/convert_dit_rss.py --layers 40 --workdir /tmp/x     # full 14B: ~28 GB
    .venv/bin/python benchmarks/convert_dit_rss.py --model umt5 --layers 1          # umT5-XXL embedding

dit: a bf16 checkpoint in the official sharded layout (one shard per block + one for the rest, with
.safetensors.index.json, as the released 14B files) with the 14B widths (dim 5120, ffn 13824, SAMA
keys included) and `--layers` blocks. umt5: an official-layout .pth (torch.save zip) with umT5-XXL's
256384 x 4096 token embedding and `--layers` full-width blocks. The checkpoint is converted in a
fresh subprocess, which prints its peak RSS (ru_maxrss: anonymous and file-backed pages together)
and wall time; the generator runs in its own process so its memory does not count. The converted
output is deleted afterwards; the generated input is kept only under --workdir (reused by later
runs, and resumed if generation was interrupted). `--code DIR` measures the converter of another
checkout (e.g. `git archive` of an earlier commit) on the same input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, FFN, TEXT, FREQ, SEM, HIDDEN = 5120, 13824, 4096, 256, 1152, 1024
T5_VOCAB, T5_DIM, T5_FFN, T5_HEADS, T5_BUCKETS = 256384, 4096, 10240, 64, 32


def _block_shapes(i):
    shapes = {
        f"blocks.{i}.modulation": (1, 6, DIM),
        f"blocks.{i}.norm3.weight": (DIM,),
        f"blocks.{i}.norm3.bias": (DIM,),
        f"blocks.{i}.ffn.0.weight": (FFN, DIM),
        f"blocks.{i}.ffn.0.bias": (FFN,),
        f"blocks.{i}.ffn.2.weight": (DIM, FFN),
        f"blocks.{i}.ffn.2.bias": (DIM,),
    }
    for attn in ("self_attn", "cross_attn"):
        for name in "qkvo":
            shapes[f"blocks.{i}.{attn}.{name}.weight"] = (DIM, DIM)
            shapes[f"blocks.{i}.{attn}.{name}.bias"] = (DIM,)
        shapes[f"blocks.{i}.{attn}.norm_q.weight"] = (DIM,)
        shapes[f"blocks.{i}.{attn}.norm_k.weight"] = (DIM,)
    return shapes


def _top_shapes():
    lin = lambda name, i, o: {f"{name}.weight": (o, i), f"{name}.bias": (o,)}
    shapes = {
        "patch_embedding.weight": (DIM, 16, 1, 2, 2),
        "patch_embedding.bias": (DIM,),
        "head.modulation": (1, 2, DIM),
        "segment_embedding.weight": (3, DIM),
        "siglip_feat_mlp.norm.weight": (SEM,),
        "siglip_feat_mlp.norm.bias": (SEM,),
        "semantic_head.norm.weight": (DIM,),
        "semantic_head.norm.bias": (DIM,),
    }
    for args in (
        ("text_embedding.0", TEXT, DIM),
        ("text_embedding.2", DIM, DIM),
        ("time_embedding.0", FREQ, DIM),
        ("time_embedding.2", DIM, DIM),
        ("time_projection.1", DIM, 6 * DIM),
        ("head.head", DIM, 64),
        ("siglip_feat_mlp.fc1", SEM, HIDDEN),
        ("siglip_feat_mlp.fc2", HIDDEN, DIM),
        ("semantic_head.proj", DIM, SEM),
    ):
        shapes.update(lin(*args))
    return shapes


def generate(folder: str, layers: int) -> None:
    """Writes the checkpoint shard by shard; shards already there are kept (each is written under
    a temporary name and renamed, so a present shard is complete), so an interrupted run resumes.
    Each block's values are one random draw scaled per layer: generation costs about the write."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    groups = [_top_shapes()] + [_block_shapes(i) for i in range(layers)]
    weight_map, base = {}, {}
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    for n, shapes in enumerate(groups):
        name = f"diffusion_pytorch_model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        weight_map.update({k: name for k in shapes})
        if os.path.exists(os.path.join(folder, name)):
            continue
        tensors = {}
        for key, shape in shapes.items():
            generic = re.sub(r"^blocks\.\d+\.", "blocks.", key)
            if generic not in base or generic == key:
                base[generic] = torch.randn(shape, generator=gen) * 0.02
            tensors[key] = (base[generic] * (1 + n / 64)).to(torch.bfloat16)
        save_file(tensors, os.path.join(folder, name + ".tmp"))
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))
        del tensors
        done = n + 1
        print(
            f"generated {done}/{len(groups)} shards, {time.time() - start:.0f}s", file=sys.stderr, flush=True
        )
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def generate_umt5(folder: str, layers: int) -> None:
    import torch

    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    state = {"token_embedding.weight": randn(T5_VOCAB, T5_DIM), "norm.weight": randn(T5_DIM)}
    for i in range(layers):
        b = f"blocks.{i}."
        state.update(
            {
                b + "norm1.weight": randn(T5_DIM),
                b + "norm2.weight": randn(T5_DIM),
                b + "pos_embedding.embedding.weight": randn(T5_BUCKETS, T5_HEADS),
                b + "ffn.gate.0.weight": randn(T5_FFN, T5_DIM),
                b + "ffn.fc1.weight": randn(T5_FFN, T5_DIM),
                b + "ffn.fc2.weight": randn(T5_DIM, T5_FFN),
            }
        )
        state.update({f"{b}attn.{n}.weight": randn(T5_DIM, T5_DIM) for n in "qkvo"})
    path = os.path.join(folder, "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _sample_rss(peaks: dict, stop) -> None:
    """Peak anonymous vs file-backed resident memory: mmapped checkpoint pages count in RSS but
    are page cache the kernel can drop, unlike the converter's own arrays (anonymous)."""
    while not stop.is_set():
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) / 2**20)
        stop.wait(0.05)


def convert(source: str, output: str, kind: str, dtype: str) -> None:
    import resource
    import threading

    from convert_wan_weights import cli

    peaks, stop = {}, threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(peaks, stop), daemon=True)
    sampler.start()
    start = time.time()
    code = cli.main([source, output, "--kind", kind, "--dtype", dtype, "--overwrite"])
    seconds = time.time() - start
    stop.set()
    sampler.join()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss / 2**20  # KiB -> GiB
    # CPU seconds do not depend on what else the machine runs, unlike the wall time.
    print(
        json.dumps(
            dict(
                exit=code,
                seconds=round(seconds, 1),
                peak_rss_gib=round(peak, 3),
                cpu_user_s=round(usage.ru_utime, 1),
                cpu_system_s=round(usage.ru_stime, 1),
                peak_anon_gib=round(peaks.get("RssAnon", 0), 3),
                peak_file_gib=round(peaks.get("RssFile", 0), 3),
            )
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="dit", choices=("dit", "umt5"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument(
        "--workdir", default=None, help="keep the generated checkpoint here (reused by later runs)"
    )
    parser.add_argument("--code", default=ROOT, help="checkout whose converter is measured")
    parser.add_argument("--_role", choices=("generate", "convert"), help=argparse.SUPPRESS)
    parser.add_argument("--_src", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._role == "generate":
        return (generate if args.model == "dit" else generate_umt5)(args._src, args.layers)
    if args._role == "convert":
        return convert(args._src, args._out, args.model, args.dtype)

    workdir = args.workdir or tempfile.mkdtemp(prefix="convert_rss_")
    folder = os.path.join(workdir, f"{args.model}_{args.layers}_layers")
    src = folder if args.model == "dit" else os.path.join(folder, "models_t5_umt5-xxl-enc-bf16.pth")
    done_marker = (
        os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json") if args.model == "dit" else src
    )
    out = os.path.join(workdir, "converted")
    me = [
        sys.executable,
        os.path.abspath(__file__),
        "--model",
        args.model,
        "--layers",
        str(args.layers),
        "--dtype",
        args.dtype,
    ]
    try:
        start = time.time()
        if not os.path.exists(done_marker):
            subprocess.run(
                me + ["--_role", "generate", "--_src", folder],
                check=True,
                env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
            )
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**30
        print(
            f"{args.layers}-layer full-width {args.model} checkpoint: {size:.2f} GiB bf16 "
            f"(ready in {time.time() - start:.0f}s)",
            flush=True,
        )
        # The converter's progress lines (stderr) pass through; its figures come on stdout.
        result = subprocess.run(
            me + ["--_role", "convert", "--_src", src, "--_out", out],
            check=True,
            env=dict(os.environ, PYTHONPATH=os.path.abspath(args.code), JAX_PLATFORMS="cpu"),
            stdout=subprocess.PIPE,
            text=True,
        )
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        written = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs) / 2**30
        print(
            f"convert --dtype {args.dtype} ({os.path.abspath(args.code)}): {figures['seconds']}s "
            f"(CPU {figures['cpu_user_s']}s user + {figures['cpu_system_s']}s system, load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores), "
            f"peak RSS (ru_maxrss) {figures['peak_rss_gib']} GiB; sampled peaks: anonymous "
            f"{figures['peak_anon_gib']} GiB, file-backed (mapped checkpoint) {figures['peak_file_gib']} GiB; "
            f"{written:.2f} GiB written (exit {figures['exit']})"
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
