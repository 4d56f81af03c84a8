"""convert-wan-weights: PyTorch checkpoint -> Orbax params checkpoint for sama_jax.

  convert-wan-weights INPUT OUTPUT [--kind auto|dit|vae|umt5|siglip] [--dtype bfloat16|float32]
                      [--allow-base-wan] [--num-heads N] [--text-len N] [--overwrite]

INPUT is a .safetensors file, a .safetensors.index.json, a directory of shards, or a .pth file.
`--kind auto` recognises the model from its keys. Each kind lives in its own module of this package
with `matches(source) -> bool` and `convert(source, output, options) -> dict` (a summary).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

from sama_jax import params_io
from tools.convert_wan_weights.source import ConversionError, TensorSource

KINDS = ("dit", "vae", "umt5", "siglip")


def _module(kind: str):
    return importlib.import_module(f"tools.convert_wan_weights.{kind}")


def detect_kind(source: TensorSource) -> str:
    found = [kind for kind in KINDS if _module(kind).matches(source)]
    if len(found) != 1:
        raise ConversionError(
            f"{source.path}: cannot tell which model this is (matches: {found or 'none'}); "
            f"pass --kind {{{','.join(KINDS)}}}")
    return found[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert-wan-weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="checkpoint file, index json or directory of shards")
    parser.add_argument("output", help="directory of the Orbax params checkpoint to write")
    parser.add_argument("--kind", default="auto", choices=("auto",) + KINDS)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="dtype stored in the checkpoint")
    parser.add_argument("--allow-base-wan", action="store_true",
                        help="dit: accept a base Wan2.1 checkpoint without SAMA's segment embedding, "
                             "semantic projector and head (segment embedding starts at zero)")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="dit: attention heads, when neither dim/128 nor a config.json next to "
                             "the weights gives them (only for non-released sizes)")
    parser.add_argument("--text-len", type=int, default=None,
                        help="dit: text tokens the model is run with (default: config.json or 512)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        source = TensorSource(args.input)
        kind = detect_kind(source) if args.kind == "auto" else args.kind
        summary = _module(kind).convert(source, args.output, args)
    except (ConversionError, params_io.ParamsCheckpointError) as e:
        print(f"convert-wan-weights: error: {e}", file=sys.stderr)
        return 1
    print(f"converted {kind} {args.input} -> {args.output} in {time.time() - start:.1f}s: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
