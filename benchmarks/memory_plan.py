"""14B memory plans: XLA's per-device memory analysis of the real train step and edit loop, lowered
for a TPU or GPU slice without the hardware. Nothing is allocated.

    PYTHONPATH=. .venv/bin/python benchmarks/memory_plan.py                  # every plan below
    pip install "libtpu==0.0.42.*"     # the jax[tpu] pin of jax 0.10.2, then TPU slices can use:
    PYTHONPATH=. .venv/bin/python benchmarks/memory_plan.py --layout v5p-64 --backend tpu
    PYTHONPATH=. .venv/bin/python benchmarks/memory_plan.py --layout v6e-64 --frames 81 --kind train
    PYTHONPATH=. .venv/bin/python benchmarks/memory_plan.py --layout 8xh100 --sharding fsdp --all-candidates
    PYTHONPATH=. .venv/bin/python benchmarks/memory_plan.py --layout v5p-64 --kind train --frames 1 \
        --samples-per-device 4    # the image-edit step at train.image_batch_size = 4 x batch_size
    PYTHONPATH=. .venv/bin/python benchmarks/memory_plan.py --config=configs/stage1_sft.py:tiny \
        --layout 8xh100 --frames 5 --height 64 --width 64 --steps 4           # a smoke run, ~1 min
    PYTHONPATH=. .venv/bin/python benchmarks/memory_plan.py --kind lora     # LoRA on one host: 8xh100,
                                                                            # v5p-8, v6e-8

Layouts: v5p-64 (32 chips of 95 GiB; the name counts TensorCores), v6e-64 (64 chips of 32 GiB),
8xh100 (8 GPUs of 80 GiB); one host: v5p-8 (4 chips of 95 GiB), v6e-8 (8 chips of 32 GiB), 8xh100. The program is compiled for as many simulated CPU devices; with
--backend tpu, TPU slices are compiled ahead of time by the TPU compiler for their topology
(jax.experimental.topologies; needs libtpu, not a TPU). The two agree: wan_14b train, v5p-64, 17
frames, fsdp=32: peak 37.17 GiB per device on CPU, 37.30 GiB from the TPU compiler (temp 30.45 /
30.58), at 1 against 4 CPU-minutes of compile. Per layout and frame count the
candidate shardings (mesh.ici, precision.remat, extra logical rules) are lowered in preference
order, fastest first (less recomputation, fewer collectives), until one fits (--all-candidates:
all), with jax.jit(...).lower(abstract inputs).compile(), and `compiled.memory_analysis()` is read:
  train   sama_jax.train_step.make_train_step of the config (default configs/stage1_sft.py:wan_14b)
          with every frozen-encoder output precomputed (data.features = all), one sample per device
          of the batch axes (train.batch_size = data x fsdp); the DiT forward + backward of SAMA's
          loss, clipping, AdamW, fp32 EMA, state donated.
  lora    the same step of a LoRA run (train.lora.rank=32, alpha 32, DiffSynth's targets q, k, v, o
          of both attentions and ffn.0, ffn.2 of every block): the base frozen in
          precision.frozen_param_dtype (bfloat16), no gradient, AdamW or EMA of it; the adapters'
          optimizer state and fp32 EMA. Default layouts: the one-host slices.
  edit    sampling.sample (the editor's loop): 50 Euler steps with CFG as one doubled batch, the
          DiT in bfloat16 as sama-edit loads it, sama-edit's rules (the CFG batch on 'data' only).
Tokens: 480x832 and F frames -> latents (1 + (F-1)/4) x 60 x 104 -> source + 65 semantic + target
(17 frames: 15,665; 49: 40,625; 81: 65,585).

Printed per device (GiB): argument, output, alias (donated), temp; params (trained + frozen) / optimizer / EMA from the
sharded state's shapes (exact per-device shard sizes), activations = temp (XLA's temporaries:
activations, gradients, gathered weights); peak = argument + output - alias + temp, compared with
the chip's HBM. A candidate fits when the peak leaves at least --headroom of HBM free.

Attention is the TPU splash kernel everywhere: the real kernel for a TPU compile; on CPU devices it
runs in Pallas interpret mode, because XLA's attention would materialise (B, H, S, S) logits, which
no accelerator path does (cuDNN on GPU keeps O(S) memory like splash). The H100 numbers are
XLA:CPU's buffer assignment of that program, not XLA:GPU's: a plan, to be confirmed on the GPUs.
Candidates whose state + gradient + saved residuals alone exceed the chip are not compiled.
Cost: one 14B lowering is ~1 CPU-minute (train) or ~15 CPU-seconds (edit); all plans take ~20
minutes on 2 idle cores (first fit), several times that on a loaded machine.

Results are merged into --json (default memory_plan.json) keyed by kind/layout/frames/sharding/
backend: a rerun of one case replaces that case only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

from sama_jax import config as config_lib  # starts no jax backend: --cpu-devices still applies
from sama_jax import dit_cost

GIB = 1024**3
DEFAULT_CONFIG = (
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "stage1_sft.py") + ":wan_14b"
)


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    ici: dict  # mesh.ici axis sizes (-1 fills)
    remat: str = "full"
    rules: tuple = ()  # logical rules put before the config's (the first match wins)


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    chips: int
    hbm_gib: float
    topology: str | None  # TPU topology for an ahead-of-time TPU compile (libtpu), else None
    train: tuple[Candidate, ...]
    edit: tuple[Candidate, ...]


def _c(name, remat="full", rules=(), **ici):
    return Candidate(name, {**dict(data=1, fsdp=1, context=1, tensor=1), **ici}, remat, rules)


# Sequence-parallel residual stream: the activations' channel dimension on 'tensor', so the residual
# each layer keeps for the backward is split over the tensor axis too (tensor parallelism alone
# replicates it on every device of a tensor group).
_SP = (("act_embed", "tensor"),)


# Fastest first: plain FSDP, then context parallelism (an all-to-all per attention), then tensor
# parallelism (collectives in every matmul). Remat of the attention outputs only is last: measured,
# it keeps far more than full remat (14B, 8xH100, 17 frames: 88.7 GiB per device against 41).
_TRAIN = (
    _c("fsdp", fsdp=-1),
    _c("fsdp+tp4+sp", rules=_SP, fsdp=-1, tensor=4),
    _c("fsdp/attn-remat", "attention", fsdp=-1),
)
# With context parallelism the parameters (and AdamW, EMA) shard over fsdp x context, not over fsdp
# alone: the context devices of a sample need the same gathered weights anyway.
_ZERO_OVER_CONTEXT = (("embed", ("fsdp", "context")),)
_TRAIN_CP = (
    _c("fsdp+cp4", rules=_ZERO_OVER_CONTEXT, fsdp=-1, context=4),
    _c("fsdp+cp8", rules=_ZERO_OVER_CONTEXT, fsdp=-1, context=8),
)
# sama-edit's default mesh is fsdp=-1 (CFG batch replicated); data=2 splits the doubled batch.
_EDIT = (
    _c("dp2+fsdp", "none", data=2, fsdp=-1),
    _c("fsdp", "none", fsdp=-1),
    _c("dp2+tp4", "none", data=2, tensor=4, fsdp=-1),
)
_EDIT_CP = (_c("dp2+cp4", "none", data=2, context=4, fsdp=-1),)

LAYOUTS = {
    "v5p-64": Layout("v5p-64", 32, 95.0, "v5p:2x4x4", _TRAIN, _EDIT),
    "v6e-64": Layout("v6e-64", 64, 32.0, "v6e:8x8", _TRAIN, _EDIT),
    "8xh100": Layout("8xh100", 8, 80.0, None, _TRAIN, _EDIT),
    "v5p-8": Layout("v5p-8", 4, 95.0, "v5p:2x2x1", _TRAIN, _EDIT),
    "v6e-8": Layout("v6e-8", 8, 32.0, "v6e:2x4", _TRAIN, _EDIT),
}
FRAMES = (17, 49, 81)
KINDS = ("train", "lora", "edit")
# The slices each kind plans by default: a LoRA run is what fits one host.
DEFAULT_LAYOUTS = {"train": ("v5p-64", "v6e-64", "8xh100"), "edit": ("v5p-64", "v6e-64", "8xh100")}
DEFAULT_LAYOUTS["lora"] = ("8xh100", "v5p-8", "v6e-8")
LORA_RANK = 32
SEMANTIC_TOKENS = 65


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--layout", action="append", choices=sorted(LAYOUTS), help="slice to plan (repeatable; default all)"
    )
    p.add_argument(
        "--frames", type=int, action="append", help=f"video frames, 4k+1 (repeatable; default {FRAMES})"
    )
    p.add_argument(
        "--kind", action="append", choices=KINDS, help="train, lora and/or edit (default train and edit)"
    )
    p.add_argument(
        "--sharding", action="append", help="candidate name(s) to lower (default all of the layout's)"
    )
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the edit")
    p.add_argument(
        "--samples-per-device",
        type=int,
        default=1,
        help="train: samples per device of the batch axes (image-edit batches: --frames 1 "
        "--samples-per-device 4 is train.image_batch_size = 4 x train.batch_size)",
    )
    p.add_argument(
        "--all-candidates",
        action="store_true",
        help="lower every candidate (default: stop at the first that fits)",
    )
    p.add_argument(
        "--backend",
        choices=("cpu", "tpu"),
        default="cpu",
        help="cpu: every slice on simulated CPU devices; tpu: TPU slices compiled ahead "
        "of time by the TPU compiler (needs libtpu; ~4x the compile time)",
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=0.1,
        help="fraction of HBM a fitting plan must leave free (default 0.1)",
    )
    p.add_argument("--json", default="memory_plan.json", help="results file (merged, not replaced)")
    p.add_argument(
        "--cpu-devices",
        "--cpu_devices",
        type=int,
        default=0,
        help="simulated devices (default: the most chips of the layouts asked for)",
    )
    return p


def parse(argv):
    """-> (config, args). Simulates the CPU devices before the config file imports jax's users."""
    spec, overrides, rest = config_lib.split_config_args(argv)
    args = build_parser().parse_args(rest)
    args.frames = args.frames or list(FRAMES)
    args.kind = args.kind or ["train", "edit"]
    args.layout = args.layout or sorted({name for kind in args.kind for name in DEFAULT_LAYOUTS[kind]})
    for f in args.frames:
        if f < 1 or (f - 1) % 4:
            raise SystemExit(f"memory_plan: error: --frames {f}: the Wan VAE takes 4k+1 frames")
    if args.height % 16 or args.width % 16:
        raise SystemExit(
            f"memory_plan: error: --height/--width {args.height}x{args.width} must be "
            "multiples of 16 (VAE 8x, patch 2x)"
        )
    chips = max(LAYOUTS[name].chips for name in args.layout)
    if args.cpu_devices and args.cpu_devices < chips:
        raise SystemExit(
            f"memory_plan: error: --cpu-devices {args.cpu_devices} < {chips} chips of {args.layout}"
        )
    if args.backend == "tpu" and not libtpu_available():
        raise SystemExit(
            'memory_plan: error: --backend tpu needs libtpu: pip install "libtpu==0.0.42.*" '
            "(the jax[tpu] pin of jax 0.10.2)"
        )
    config_lib.simulate_cpu_devices([f"--cpu_devices={max(chips, args.cpu_devices)}"])
    return config_lib.build_config(spec or DEFAULT_CONFIG, overrides), args


# -- lowering -------------------------------------------------------------------------------------

_INTERPRET = [True]


def splash_attention_everywhere():
    """The DiT's attention as the TPU splash kernel: compiled for the TPU ahead of time, or in
    Pallas interpret mode on CPU devices (see the docstring). 'auto' would pick by the default
    backend, which is the CPU here in both cases."""
    from sama_jax.models import attention as attention_lib
    from sama_jax.models import wan_dit

    attention, self_attention = attention_lib.attention, attention_lib.self_attention

    def cross(q, k, v, implementation="auto"):
        return attention(q, k, v, "splash", splash_interpret=_INTERPRET[0])

    def own(q, k, v, implementation="auto", context_parallel="auto", kv_valid=None):
        return self_attention(q, k, v, "splash", context_parallel, kv_valid, splash_interpret=_INTERPRET[0])

    wan_dit.attention, attention_lib.self_attention = cross, own


def tpu_devices(topology: str):
    """The devices of a TPU slice for an ahead-of-time compile (needs libtpu, not a TPU)."""
    from jax.experimental import topologies

    # Compile-only use: several plans may run at once (libtpu otherwise locks the TPU for one).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def latent_shape(frames, height, width):
    return (*dit_cost.latent_grid(frames, height, width), 16)


def tokens(config, frames, height, width):
    f, h, w, _ = latent_shape(frames, height, width)
    pt, ph, pw = config.model.dit.patch_size
    return 2 * (f // pt) * (h // ph) * (w // pw) + SEMANTIC_TOKENS


def run_config(config, candidate: Candidate, kind: str):
    """The config with the candidate's mesh, remat and (train) a batch of one sample per batch shard."""
    import ml_collections

    from sama_jax import features

    c = ml_collections.ConfigDict(config.to_dict())
    c.mesh.ici = dict(candidate.ici)
    c.precision.remat = candidate.remat
    c.sharding_rules = [list(r) for r in candidate.rules] + list(c.sharding_rules)
    if kind in ("train", "lora"):
        c.data.features = features.NAMES
        c.train.grad_accum = 1
    if kind == "lora":
        c.train.lora.update(rank=LORA_RANK, alpha=float(LORA_RANK))
    return c


def _sds(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard per leaf)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


class NotLowered(Exception):
    """A candidate whose memory lower bound already exceeds the chip: not worth a compile."""


def saved_residual_bytes(config, mesh, rules, frames, height, width) -> int:
    """What the backward must keep per device at least, whatever XLA does: the residual stream
    entering each layer (remat full), plus each layer's attention output (remat attention), for the
    device's share of one sample's tokens."""
    import numpy as np

    from sama_jax import sharding

    cfg, shape, precision = config.model.dit, dict(mesh.shape), config.precision

    def split(name):
        return math.prod(shape[a] for a in jax_axes(sharding.logical_to_mesh_spec((name,), rules)[0]))

    samples = config.train.batch_size / split("batch")
    local_tokens = samples * tokens(config, frames, height, width) / split("length")
    per_layer = local_tokens * cfg.dim / split("act_embed") * np.dtype(precision.residual_dtype).itemsize
    if precision.remat == "attention":
        per_layer += local_tokens * cfg.dim / split("act_heads") * np.dtype(precision.compute_dtype).itemsize
    return int(cfg.num_layers * per_layer)


def jax_axes(axes):
    return () if axes is None else (axes if isinstance(axes, tuple) else (axes,))


def lower_train(config, mesh, rules, frames, height, width, hbm_bytes=None, samples_per_device=1):
    """-> (compiled, {part: per-device bytes}, global batch). With hbm_bytes, raises NotLowered when
    the state, its gradient and the saved residuals alone exceed it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sama_jax import encoders as encoders_lib
    from sama_jax import lora_train, train_step
    from sama_jax.features import BATCH_PREFIX
    from sama_jax.models import wan_dit

    num_shards = math.prod(dict(mesh.shape)[a] for a in ("data", "fsdp"))
    with config.unlocked():
        config.train.batch_size = num_shards * samples_per_device
    dit_cfg = wan_dit.WanDiTConfig.from_config(config.model.dit, config.precision)
    if lora_train.enabled(config):
        dit = lora_train.abstract_dit(dit_cfg, config.train.lora)
    else:
        dit = wan_dit.abstract_dit(dit_cfg)
    encoders = encoders_lib.build(config, nnx.Rngs(0), names=())
    parts = train_step.StepParts.build(config, mesh, rules, dit, encoders)
    state = parts.abstract_state(parts.dit_trainable)
    frozen = _sds(parts.dit_frozen, parts.dit_frozen_shardings)  # a LoRA run's base
    b, lat, cfg = config.train.batch_size, latent_shape(frames, height, width), config.model.dit
    shapes = {
        "target_latents": (b, *lat),
        "source_latents": (b, *lat),
        "text": (b, cfg.text_len, cfg.text_dim),
        "semantic": (b, SEMANTIC_TOKENS, cfg.semantic_dim),
    }
    batch = {
        BATCH_PREFIX + k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=parts.batch_sharding)
        for k, s in shapes.items()
    }
    batch["valid"] = jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=parts.batch_sharding)
    encoder_state = _sds(parts.encoder_state, parts.encoder_shardings)
    if hbm_bytes is not None:
        bound = (
            per_device_bytes(state)
            + per_device_bytes(frozen)
            + per_device_bytes(state["params"])
            + saved_residual_bytes(config, mesh, rules, frames, height, width)
        )
        if bound > hbm_bytes:
            raise NotLowered(
                f"not lowered: state + gradient + saved residuals alone are {bound / GIB:.1f} GiB"
            )
    compiled = train_step.make_train_step(config, parts).lower(state, encoder_state, batch).compile()
    split = dict(
        params=per_device_bytes(state["params"]) + per_device_bytes(frozen),
        optimizer=per_device_bytes(state["opt_state"]),
        ema=per_device_bytes(state["ema"]),
        batch=per_device_bytes(batch),
    )
    return compiled, split, b


def lower_edit(config, mesh, rules, frames, height, width, steps):
    """-> (compiled, {part: per-device bytes}, batch incl. CFG)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from sama_jax import sampling, sharding
    from sama_jax.models import wan_dit

    # As sama-edit loads the DiT: parameters and compute in bfloat16, residual stream fp32.
    precision = dict(
        config.precision, param_dtype="bfloat16", compute_dtype="bfloat16", residual_dtype="float32"
    )
    dit_cfg = wan_dit.WanDiTConfig.from_config(config.model.dit, precision)
    graphdef, state = nnx.split(wan_dit.abstract_dit(dit_cfg))
    state = _sds(state, sharding.state_shardings(state, mesh, rules))
    cfg = config.model.dit
    replicated = NamedSharding(mesh, PartitionSpec())
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    lat = (1, *latent_shape(frames, height, width))
    noise, semantic_noise = sds(lat, jnp.bfloat16), sds((1, SEMANTIC_TOKENS, cfg.semantic_dim), jnp.bfloat16)
    cond = {"text": sds((1, cfg.text_len, cfg.text_dim), jnp.bfloat16), "source": sds(lat, jnp.float32)}
    schedule = sampling.make_schedule("euler", steps, 5.0)
    velocity_fn = sampling.dit_velocity_fn(graphdef)

    def edit(state, noise, semantic_noise, cond, uncond):
        return sampling.sample(
            velocity_fn, state, noise, semantic_noise, cond, uncond, schedule, guidance=5.0, cfg_mode="batch"
        )

    with sharding.use_mesh(mesh, rules):
        compiled = jax.jit(edit).lower(state, noise, semantic_noise, cond, dict(cond)).compile()
    split = dict(
        params=per_device_bytes(state),
        optimizer=0,
        ema=0,
        batch=per_device_bytes((noise, semantic_noise, cond, cond)),
    )
    return compiled, split, 2


def analyse(compiled, split, hbm_gib, headroom):
    m = compiled.memory_analysis()
    arg, out, alias, temp = (
        int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")
    )
    peak = arg + out - alias + temp
    gib = lambda x: round(x / GIB, 3)
    return dict(
        argument=gib(arg),
        output=gib(out),
        alias=gib(alias),
        temp=gib(temp),
        params=gib(split["params"]),
        optimizer=gib(split["optimizer"]),
        ema=gib(split["ema"]),
        inputs=gib(split["batch"]),
        activations=gib(temp),
        peak=gib(peak),
        headroom=gib(hbm_gib * GIB - peak),
        fits=bool(peak <= (1.0 - headroom) * hbm_gib * GIB),
    )


# -- the run ---------------------------------------------------------------------------------------


def groups(args):
    """[(layout, kind, frames, candidates in preference order)]."""
    out = []
    for layout_name in args.layout:
        layout = LAYOUTS[layout_name]
        for kind in args.kind:
            candidates = layout.edit if kind == "edit" else layout.train
            # Context parallelism after plain FSDP, before tensor parallelism.
            extra = _EDIT_CP if kind == "edit" else _TRAIN_CP
            candidates = candidates[:1] + extra + candidates[1:]
            candidates = [c for c in candidates if not args.sharding or c.name in args.sharding]
            for frames in args.frames:
                if candidates:
                    out.append((layout, kind, frames, candidates))
    return out


def load_results(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        results = json.load(f)["results"]
    for r in results:  # records of older versions lack the newer fields
        r.setdefault("backend", "cpu")
        r.setdefault("samples_per_device", 1)
    return results


def save_results(path, results):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"results": results}, f, indent=1)
    os.replace(tmp, path)


def _key(r):
    return (
        r["kind"],
        r["layout"],
        r["frames"],
        r["sharding"],
        r["preset"],
        r["num_layers"],
        r["height"],
        r["width"],
        r["backend"],
        r["samples_per_device"],
    )


def lower_case(config, args, layout, kind, frames, cand, backend):
    """One lowering -> its result record."""
    import jax

    from sama_jax import sharding

    c = run_config(config, cand, kind)
    _INTERPRET[0] = backend == "cpu"
    devices = tpu_devices(layout.topology) if backend == "tpu" else jax.devices()[: layout.chips]
    t0 = time.perf_counter()
    memory, error, batch, mesh = None, None, 0, None
    try:
        mesh = sharding.create_mesh(c.mesh, devices)
        rules = sharding.axis_rules(c.sharding_rules)
        if kind == "edit":  # as sama-edit: the CFG batch on 'data' only, never on fsdp
            rules = (("batch", "data"),) + rules
        if kind in ("train", "lora"):
            compiled, split, batch = lower_train(
                c,
                mesh,
                rules,
                frames,
                args.height,
                args.width,
                (1 - args.headroom) * layout.hbm_gib * GIB,
                samples_per_device=args.samples_per_device,
            )
        else:
            compiled, split, batch = lower_edit(c, mesh, rules, frames, args.height, args.width, args.steps)
        memory = analyse(compiled, split, layout.hbm_gib, args.headroom)
    except (ValueError, TypeError, NotLowered) as e:  # a mesh or shape this candidate cannot take
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    return dict(
        kind=kind,
        layout=layout.name,
        chips=layout.chips,
        hbm_gib=layout.hbm_gib,
        backend=backend,
        frames=frames,
        tokens=tokens(config, frames, args.height, args.width),
        height=args.height,
        width=args.width,
        sharding=cand.name,
        mesh=dict(mesh.shape) if mesh is not None else cand.ici,
        remat=cand.remat,
        rules=[list(r) for r in cand.rules],
        batch=batch,
        samples_per_device=args.samples_per_device if kind != "edit" else 1,
        preset=config.model.preset,
        num_layers=int(config.model.dit.num_layers),
        memory=memory,
        error=error,
        compile_s=round(time.perf_counter() - t0, 1),
        jax=jax.__version__,
    )


def main(argv=None) -> int:
    config, args = parse(sys.argv[1:] if argv is None else argv)
    import jax

    splash_attention_everywhere()
    use_tpu = args.backend == "tpu"
    todo = groups(args)
    if not todo:
        raise SystemExit(f"memory_plan: error: no candidate named {args.sharding}")
    results = load_results(args.json)
    total = sum(len(g[3]) if args.all_candidates else 1 for g in todo)
    print(
        f"{config.model.preset} ({config.model.dit.num_layers} layers): {len(todo)} plans, at least "
        f"{total} lowerings; TPU slices {'compiled for TPU (libtpu)' if use_tpu else 'on CPU devices'}"
        f", others on {jax.device_count()} simulated CPU devices; results -> {args.json}",
        flush=True,
    )
    start, done = time.perf_counter(), 0
    for i, (layout, kind, frames, candidates) in enumerate(todo):
        backend = "tpu" if use_tpu and layout.topology else "cpu"
        for cand in candidates:
            record = lower_case(config, args, layout, kind, frames, cand, backend)
            results = [r for r in results if _key(r) != _key(record)] + [record]
            save_results(args.json, results)
            done += 1
            eta = (time.perf_counter() - start) / (i + 1) * (len(todo) - i - 1)
            print(
                f"[plan {i + 1}/{len(todo)}] {_line(record)}  ({record['compile_s']:.0f}s; "
                f"ETA {eta / 60:.1f} min)",
                flush=True,
            )
            if record["memory"] and record["memory"]["fits"] and not args.all_candidates:
                break
    print()
    print_table(
        [
            r
            for r in results
            if r["preset"] == config.model.preset and r["num_layers"] == int(config.model.dit.num_layers)
        ]
    )
    return 0


def _line(r):
    head = f"{r['kind']:5} {r['layout']:7} {r['frames']:3}f {r['sharding']:16}"
    if r["memory"] is None:
        return f"{head} {r['error']}"
    m = r["memory"]
    return (
        f"{head} peak {m['peak']:7.2f} GiB of {r['hbm_gib']:.0f} "
        f"({'fits' if m['fits'] else 'DOES NOT FIT'}, headroom {m['headroom']:.1f})"
    )


def print_table(results):
    cols = ("params", "optimizer", "ema", "inputs", "argument", "output", "alias", "temp", "peak")
    order = {name: i for i, name in enumerate(LAYOUTS)}
    preference = {
        (kind, c.name): i
        for kind, cands in (
            ("train", _TRAIN[:1] + _TRAIN_CP + _TRAIN[1:]),
            ("lora", _TRAIN[:1] + _TRAIN_CP + _TRAIN[1:]),
            ("edit", _EDIT[:1] + _EDIT_CP + _EDIT[1:]),
        )
        for i, c in enumerate(cands)
    }
    results = sorted(
        results,
        key=lambda r: (
            r["kind"],
            order.get(r["layout"], 9),
            r["frames"],
            preference.get((r["kind"], r["sharding"]), 99),
        ),
    )
    print("per-device memory (GiB); activations = temp; peak = argument + output - alias + temp")
    print(
        f"{'kind':5} {'layout':7} {'backend':7} {'frames':>6} {'tokens':>6} {'sharding':16} "
        f"{'mesh d/f/c/t':12} {'batch':>5} " + " ".join(f"{c:>9}" for c in cols) + "  fits"
    )
    best = {}
    for r in results:
        mesh = "/".join(str(r["mesh"].get(a, 1)) for a in ("data", "fsdp", "context", "tensor"))
        m = r["memory"]
        if m is None:
            vals = f"{r['error'][:60]}"
        else:
            vals = " ".join(f"{m[c]:9.2f}" for c in cols) + f"  {'yes' if m['fits'] else 'NO'}"
            if m["fits"]:
                best.setdefault((r["kind"], r["layout"], r["frames"]), r)
        print(
            f"{r['kind']:5} {r['layout']:7} {r['backend']:7} {r['frames']:6} {r['tokens']:6} "
            f"{r['sharding']:16} {mesh:12} {r['batch']:5} {vals}"
        )
    print("\nrecommended (first fitting candidate, fastest first):")
    ranked = sorted(best.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9), kv[0][2]))
    for (kind, layout, frames), r in ranked:
        ici = ",".join(f"{a}={s}" for a, s in r["mesh"].items() if s != 1) or "one device"
        print(
            f"  {kind:5} {layout:7} {frames:3}f: {r['sharding']:16} mesh {ici}, remat={r['remat']}"
            f" -> {r['memory']['peak']:.1f} GiB of {r['hbm_gib']:.0f}"
        )
    # Candidate orders differ per kind, so a key with no fitting candidate is named too.
    for r in results:
        key = (r["kind"], r["layout"], r["frames"])
        if key not in best:
            best[key] = None
            print(f"  {r['kind']:5} {r['layout']:7} {r['frames']:3}f: none of the candidates fits")


if __name__ == "__main__":
    sys.exit(main())
