"""SAMA stage 1: supervised fine-tuning on paired video edits + image edits.

Run (after `pip install -r requirements.txt -e .`):
  sama-train --config=configs/stage1_sft.py:tiny --workdir=runs/tiny --cpu_devices=8   # CPU, minutes
  sama-train --config=configs/stage1_sft.py:wan_14b --workdir=gs://... \
      --config.checkpoint.init_from=ckpt/wan14b_dit --config.model.checkpoints.vae=ckpt/vae ...
  sama-train --config=configs/stage1_sft.py:wan_14b --workdir=DIR --config.train.lora.rank=32 \
      --config.optimizer.lr=1e-4 --config.checkpoint.init_from=ckpt/sama14b ...   # LoRA on one host
  sama-smoke --config=configs/stage1_sft.py:tiny --cpu_devices=8   # the objective, no update
  sama-mesh-info --config=configs/stage1_sft.py:wan_14b            # the mesh it asks for
Sizing (not yet measured with this code): wan_14b is the paper's model; the anchors have the 1.3B
DiT training at 81 frames in 19.2 GiB on one H100 with remat (diffusers).
Any field can be overridden: --config.optimizer.lr=1e-5 --config.mesh.ici.fsdp=-1

The argument selects the model preset (tiny | demo | wan_1_3b | wan_14b); tiny (the tests' model) and
demo (sama-demo's) also switch to the generated dataset, small frames and a few steps so they run in
minutes on a CPU.
"""

import ml_collections

from sama_jax import edit_rules, presets, sharding


def get_config(arg: str = "wan_14b") -> ml_collections.ConfigDict:
    preset = arg or "wan_14b"
    # tiny (tests) and demo (sama-demo) run on a CPU: generated data, 64x64 frames, fp32.
    tiny = preset in presets.CPU_PRESETS
    c = ml_collections.ConfigDict()
    c.stage = 1
    c.seed = 0
    c.workdir = "runs/stage1_" + preset

    c.model = presets.model_config(preset)
    # Prepended to every instruction before umT5, in training, precompute, evaluation and sama-edit
    # (the released inference's --prompt-prefix; its negative prompt is the prefix alone; the rule:
    # edit_rules.with_prefix).
    c.prompt_prefix = edit_rules.PROMPT_PREFIX
    c.precision = ml_collections.ConfigDict(
        dict(
            param_dtype="float32",  # the trained DiT's parameters (fp32 masters)
            # The frozen encoders (VAE, umT5, SigLIP) hold their parameters in this dtype: no optimizer
            # needs fp32 copies of them.
            frozen_param_dtype="float32" if tiny else "bfloat16",
            compute_dtype="float32" if tiny else "bfloat16",
            # The official Wan code keeps the residual stream and modulation in fp32; "bfloat16" runs
            # everything in the compute dtype (diffusers' behaviour).
            residual_dtype="float32",
            attention="auto",  # auto | xla | cudnn | splash
            remat="none" if tiny else "full",  # none | full | attention
            # Self-attention over the mesh's `context` axis (when its size > 1): ulysses (all-to-all
            # over heads), ring (k/v blocks passed around, for too few heads), auto (ulysses if the
            # heads divide, else ring).
            context_parallel="auto",
            scan_layers=True,  # nnx.scan over the blocks (False: a Python loop)
        )
    )

    c.mesh = ml_collections.ConfigDict(
        dict(
            ici=dict(data=1, fsdp=-1, context=1, tensor=1),
            dcn=dict(data=1, fsdp=1, context=1, tensor=1),
        )
    )
    c.sharding_rules = [list(rule) for rule in sharding.DEFAULT_RULES]

    c.data = ml_collections.ConfigDict(
        dict(
            # Relative mixture paths resolve against root ("" = the current directory); every path is
            # checked before anything else runs.
            root="",
            # Mixture of manifests (or shards=<sama-build-shards directory>) by kind; weights are
            # sampling probabilities.
            mixture=[
                dict(kind="video_edit", manifest="data/synthetic/video_edits.jsonl", weight=0.7),
                dict(kind="image_edit", manifest="data/synthetic/image_edits.jsonl", weight=0.3),
            ],
            num_frames=5 if tiny else 81,
            # Frames are taken from frame 0 at frame_stride, or at round(clip fps / fps) when fps > 0 and
            # the record has an fps; a clip giving fewer than min_frames (4k+1) frames is skipped.
            frame_stride=1,
            fps=0.0,
            min_frames=5,
            pixels=64 * 64 if tiny else 480 * 832,
            # Aspect-ratio buckets (h/w): 1/2, 2/3, 3/4, 1 and reciprocals, as in the paper.
            aspect_ratios=(0.5, 2 / 3, 0.75, 1.0, 4 / 3, 1.5, 2.0),
            size_multiple=32 if not tiny else 16,
            # Degenerate media are skipped (counted as too_small / bad_aspect) instead of being upscaled
            # from a few pixels or cropped to a sliver: min(h, w) of source and target, max(h, w)/min(h, w).
            min_size=8 if tiny else 32,
            max_aspect=4.0,
            # Precomputed features carried into the batch (sama-precompute), e.g. ("text", "semantic").
            features=(),
            motion_alignment=False,
            worker_count=0 if tiny else 8,
            read_threads=1,  # decode threads per worker (PyAV and Pillow release the GIL)
            # Every process plans the global batches from per-sample metadata (size keys, else header
            # probes); > 0 reads ahead with threads, for probes on remote storage while workers decode.
            metadata_threads=0,
            prefetch=2,
            # A mixture entry whose metadata pass skips more than this fraction of its records (checked
            # once it has 20) stops the run ("error", naming the entry and the top reasons) or "warn"s.
            max_skip_fraction=0.5,
            on_skip_excess="error",
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            batch_size=8 if tiny else 32,  # global; tiny: one sample per simulated CPU device
            # Global size of the image-edit (single-frame) batches; 0 = batch_size. A 1-frame sample
            # costs ~1/20 of an 81-frame one, so images come 4x as many per batch (the released
            # trainer's bs_img 16 : bs_vid 4). Both must divide by grad_accum x (mesh data x fsdp).
            image_batch_size=16 if tiny else 128,
            # Micro-batches per step, accumulated inside the jitted step (batch_size must divide).
            grad_accum=1,
            steps=20 if tiny else 20_000,
            semantic_loss_weight=0.1,
            # Ablation switch: False trains without semantic tokens (no SigLIP, no semantic loss).
            semantic_anchoring=True,
            timestep_shift=5.0,
            loss_weighting="none",  # none | gaussian_bump (the released DiffSynth trainer's w(t))
            # The run stops (after saving the last good state) when this many steps in a row had a
            # non-finite loss or gradient; each such step leaves parameters and optimizer unchanged.
            max_nonfinite_in_row=3 if tiny else 20,
            log_every=5 if tiny else 50,
            # Peak dense bf16 TFLOP/s of one device, for MFU (v5p 459, v6e 918, H100 989 spec / 800
            # measured matmul).
            peak_tflops=459.0,
            profile_steps=0,  # > 0: a profiler trace of this many steps after the first log
            log_sample_ids=False,  # append each step's sample ids to WORKDIR/sample_ids.*.jsonl
            # LoRA (sama_jax/lora_train.py): rank > 0 trains low-rank adapters (update alpha / rank *
            # x A B, B = 0 at step 0) on the DiT Linears whose official names match `targets` (fnmatch
            # patterns; default: DiffSynth's q, k, v, o, ffn.0, ffn.2 of every block), and the modules
            # matching `extra_trainable` in full (e.g. "siglip_feat_mlp", "semantic_head",
            # "segment_embedding" when the base is a plain Wan2.1); the rest is the frozen base of
            # checkpoint.init_from, in precision.frozen_param_dtype. rank 0: full fine-tuning.
            lora=dict(
                rank=0,
                alpha=32.0,
                targets=(
                    "blocks.*.self_attn.[qkvo]",
                    "blocks.*.cross_attn.[qkvo]",
                    "blocks.*.ffn.0",
                    "blocks.*.ffn.2",
                ),
                extra_trainable=(),
            ),
        )
    )
    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=1e-3 if tiny else 2e-5,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            grad_clip_norm=1.0,
            # fp32 EMA of the parameters; tiny: a short horizon so a 20-step run's EMA moves.
            ema_decay=0.99 if tiny else 0.9998,
        )
    )
    c.schedule = ml_collections.ConfigDict(
        dict(
            warmup_steps=2 if tiny else 500,  # linear from 0
            decay="constant",  # constant | cosine (to end_lr_fraction * lr at the last step)
            end_lr_fraction=0.0,
        )
    )
    c.checkpoint = ml_collections.ConfigDict(
        dict(
            every_steps=10 if tiny else 1000,
            keep=3,
            async_save=not tiny,
            # A converted Wan2.1 DiT or SAMA-14B params checkpoint (convert-wan-weights), or a stage-0
            # run directory (its parameters, a fresh optimizer); empty: random initialisation.
            init_from="",
        )
    )
    # Frozen encoders and tokenizer: converted checkpoints (convert-wan-weights) and the umT5
    # tokenizer directory. Empty is allowed for the tiny preset only: random encoders, saved into
    # the workdir, and a tokenizer trained on the generated data.
    c.model.checkpoints = ml_collections.ConfigDict(dict(vae="", text_encoder="", siglip="", tokenizer=""))
    c.eval = ml_collections.ConfigDict(
        dict(
            every_steps=10 if tiny else 2000,
            num_steps=4 if tiny else 50,
            guidance=5.0,
            shift=5.0,
            sampler="euler",
            # Evaluator modules of sama_jax/evaluators run every every_steps on the EMA parameters.
            evaluators=("val_loss",) if tiny else (),
            use_ema=True,
            val_loss=dict(
                # Held-out data (tiny: the generated val split); the loss at fixed sigmas and noise.
                mixture=[
                    dict(kind="video_edit", manifest="data/synthetic/val/video_edits.jsonl", weight=0.5),
                    dict(kind="image_edit", manifest="data/synthetic/val/image_edits.jsonl", weight=0.5),
                ],
                batch_size=8,
                batches=2,
                sigmas=(0.25, 0.5, 0.75),
            ),
            # sama_jax.evaluators.edit_scores: edits of the synthetic held-out split (own generator
            # seed) scored against their exact targets, frames x height x width.
            edit_scores=dict(
                num_cases=4 if tiny else 8,
                seed=1000,
                frames=5 if tiny else 17,
                height=64 if tiny else 480,
                width=64 if tiny else 832,
                # The first cases also go to TensorBoard as pictures (rows: source, edit, target).
                sample_images=2,
            ),
        )
    )
    if preset == "demo":
        # sama-demo trains this DiT for ~1,000 steps on precomputed features (see sama_jax/demo.py):
        # a longer warmup and a cosine decay for its larger width, an EMA over ~200 steps.
        c.optimizer.lr = 1e-3
        c.optimizer.ema_decay = 0.995
        c.schedule.update(warmup_steps=50, decay="cosine", end_lr_fraction=0.05)
        c.train.log_every = 50
    return c
