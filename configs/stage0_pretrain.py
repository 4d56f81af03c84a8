"""SAMA stage 0: factorized pre-training (image edits + raw clips with motion-alignment pretext tasks).

Run (after `pip install -r requirements.txt -e .`):
  sama-train --config=configs/stage0_pretrain.py:tiny --workdir=runs/tiny0 --cpu_devices=8  # CPU
  sama-smoke --config=configs/stage0_pretrain.py:tiny --cpu_devices=8   # the objective, no update
  sama-mesh-info --config=configs/stage0_pretrain.py:wan_14b            # the mesh it asks for

Same sections as configs/stage1_sft.py; this file changes the stage, the data mixture and the
motion-alignment transforms applied to the source of raw clips.
"""
import os

import ml_collections

from sama_jax.config import load_config_file


def get_config(arg: str = "wan_14b") -> ml_collections.ConfigDict:
    # The stage-1 file is the base, so the two stages cannot drift apart.
    stage1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage1_sft.py")
    c = load_config_file(f"{stage1}:{arg or 'wan_14b'}")
    c.stage = 0
    c.workdir = c.workdir.replace("stage1_", "stage0_")
    c.data.mixture = [
        dict(kind="image_edit", manifest="data/synthetic/image_edits.jsonl", weight=0.5),
        dict(kind="t2v", manifest="data/synthetic/clips.jsonl", weight=0.5),
    ]
    c.eval.val_loss.mixture = [
        dict(kind="image_edit", manifest="data/synthetic/val/image_edits.jsonl", weight=0.5),
        dict(kind="t2v", manifest="data/synthetic/val/clips.jsonl", weight=0.5),
    ]
    c.data.motion_alignment = True
    c.data.pretext = ml_collections.ConfigDict(dict(
        # Mixing weights none:cube:speed:shuffle = 1:2:3:4 (paper).
        weights=dict(none=1.0, cube=2.0, speed=3.0, shuffle=4.0),
        cube_mask_ratio=0.3,
        cube_mode="spatial",      # spatial | full_frame (the released code's variant)
        speed_factor=2.0,
        speed_mode="fixed",       # fixed | alternate (the released code's alternation)
        shuffle_grid=(2, 2, 2),   # (t, h, w); the released code uses (4, 4, 4)
        # Prepended to the caption; the released code names none. "none" = plain text-to-video.
        tokens=dict(none="", cube="[cube inpainting]", speed="[speed perturbation]",
                    shuffle="[tube shuffle]"),
        none_source="black",      # black (no source content) | copy (source = the clip)
    ))
    return c
