"""convert-wan-weights: PyTorch checkpoint -> Orbax params checkpoint for sama_jax.

  convert-wan-weights INPUT OUTPUT [--kind auto|dit|vae|umt5|siglip] [--dtype bfloat16|float32]
                      [--allow-base-wan] [--num-heads N] [--text-len N] [--overwrite]

INPUT is a .safetensors file, a .safetensors.index.json, a directory of shards, or a .pth file.
`--kind auto` recognises the model from its keys. Each kind lives in its own module of this package
with `matches(source) -> bool` and `convert(source, output, options) -> dict` (a summary).

Before reading INPUT: OUTPUT's parent must be writable, OUTPUT must not exist (or be a params
checkpoint, with --overwrite), and what an interrupted earlier run left is finished or deleted
(sama_jax/params_io.py). Expected errors print one line, `convert-wan-weights: <message>`, and
exit with status 2; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time

from sama_jax import params_io
from sama_jax.tensor_source import ConversionError, TensorSource

KINDS = ("dit", "vae", "umt5", "siglip")


def _module(kind: str):
    return importlib.import_module(f"convert_wan_weights.{kind}")


def detect_kind(source: TensorSource) -> str:
    found = [kind for kind in KINDS if _module(kind).matches(source)]
    if len(found) != 1:
        raise ConversionError(
            f"{source.path}: cannot tell which model this is (matches: {found or 'none'}); "
            f"pass --kind {{{','.join(KINDS)}}}"
        )
    return found[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert-wan-weights", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="checkpoint file, index json or directory of shards")
    parser.add_argument("output", help="directory of the Orbax params checkpoint to write")
    parser.add_argument("--kind", default="auto", choices=("auto",) + KINDS)
    parser.add_argument(
        "--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="dtype stored in the checkpoint"
    )
    parser.add_argument(
        "--allow-base-wan",
        action="store_true",
        help="dit: accept a base Wan2.1 checkpoint without SAMA's segment embedding, "
        "semantic projector and head (segment embedding starts at zero)",
    )
    parser.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="dit: attention heads, when neither dim/128 nor a config.json next to "
        "the weights gives them (only for non-released sizes)",
    )
    parser.add_argument(
        "--text-len",
        type=int,
        default=None,
        help="dit: text tokens the model is run with (default: config.json or 512)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return parser


# Errors with a message that says what to change: one line, no traceback.
EXPECTED_ERRORS = (ConversionError, params_io.ParamsCheckpointError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        # Everything about OUTPUT is checked before the input is read.
        for line in params_io.check_output(args.output, args.overwrite):
            print(f"convert-wan-weights: {line}", file=sys.stderr)
        source = TensorSource(args.input)
        kind = detect_kind(source) if args.kind == "auto" else args.kind
        itemsize = 2 if args.dtype == "bfloat16" else 4
        params_io.check_free_space(
            args.output, itemsize * sum(math.prod(source.shape(key)) for key in source.keys())
        )
        summary = _module(kind).convert(source, args.output, args)
    except EXPECTED_ERRORS as e:
        print(f"convert-wan-weights: {e}", file=sys.stderr)
        return 2
    print(f"converted {kind} {args.input} -> {args.output} in {time.time() - start:.1f}s: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
