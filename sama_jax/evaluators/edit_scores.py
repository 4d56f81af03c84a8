"""Evaluator: fixed held-out synthetic edits, edited by the current DiT, scored against exact targets.

    evaluator = EditScores(config, encoders, tokenizer, mesh=mesh, rules=rules)
    for name, value in evaluator.run(dit, step):     # ("edit_scores/psnr_in", 23.1), ...
        writer.write_scalars(step, {name: value})

config.eval.edit_scores: num_cases cases of the synthetic generator's held-out split (every case
shows a (colour, shape) pair the training split never shows: sama_jax.data.synthetic.HELD_OUT_PAIRS),
drawn with their own seed, at frames x height x width; the sampler, steps, guidance and shift are config.eval's, the prompt prefix is
config.prompt_prefix. The edited region of each case is exact: the pixels where the lossless
renders of source and target differ. Yields, over all cases, PSNR and SSIM inside the region
(instruction following) and outside it (preservation), temporal_ssim and temporal_diff_rmse
(sama_jax.scores), and PSNR in/out per edit type; PSNRs of identical pixels (inf) count as
scores.PSNR_CAP in the means. Every run edits the same cases with the same noise seed, so the
numbers are comparable across steps. The first sample_images cases are also yielded as pictures
(edit_samples/<i>_<type>: rows source, edit, target; sama-train writes them to TensorBoard's
Images tab), so the edits can be watched, not only their scores.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import numpy as np

from sama_jax import previews, scores
from sama_jax.data import synthetic

PREFIX = "edit_scores"
METRICS = ("psnr_in", "ssim_in", "psnr_out", "ssim_out", "temporal_ssim", "temporal_diff_rmse")
PER_TYPE_METRICS = ("psnr_in", "psnr_out")
SAMPLES_PREFIX = "edit_samples"
SAMPLE_COLUMNS = 5


@dataclasses.dataclass(frozen=True)
class HeldOutCase:
    source: np.ndarray  # (T, H, W, 3) uint8, exact render
    target: np.ndarray  # the exact edited render
    region: np.ndarray  # (T, H, W) bool: where source and target differ
    instruction: str
    edit_type: str


def held_out_cases(num_cases: int, seed: int, frames: int, height: int, width: int) -> list[HeldOutCase]:
    cases = []
    for i in range(num_cases):
        source, target, text, record = synthetic.make_video_edit(
            seed, i, frames, height, width, held_out=True
        )
        cases.append(
            HeldOutCase(source, target, scores.edit_region(source, target, threshold=0), text, record["type"])
        )
    return cases


def score_cases(
    edit: Callable[[np.ndarray, str], np.ndarray], cases: list[HeldOutCase], sample_images: int = 0
) -> Iterator[tuple[str, float | np.ndarray]]:
    """edit(source, instruction) -> uint8 frames; yields the aggregated (name, value) pairs, then
    (name, (H, W, 3) uint8 contact sheet) for the first sample_images cases."""
    if not cases:
        return
    rows, sheets, start = [], [], time.perf_counter()
    for i, case in enumerate(cases):
        edited = edit(case.source, case.instruction)
        rows.append((case.edit_type, scores.score_edit(edited, case.target, region=case.region)))
        if i < sample_images:
            sheet = previews.contact_sheet([case.source, edited, case.target], columns=SAMPLE_COLUMNS)
            sheets.append((f"{SAMPLES_PREFIX}/{i}_{case.edit_type}", sheet))
    seconds = (time.perf_counter() - start) / max(1, len(cases))
    table = scores.aggregate(rows)
    for name in METRICS:
        if name in table["all"]:
            yield f"{PREFIX}/{name}", float(table["all"][name])
    for edit_type, row in table.items():
        if edit_type == "all":
            continue
        for name in PER_TYPE_METRICS:
            if name in row:
                yield f"{PREFIX}/{edit_type}/{name}", float(row[name])
    yield f"{PREFIX}/seconds_per_case", seconds
    yield from sheets


class EditScores:
    """Held-out synthetic edit scores of the DiT being trained (config.eval.edit_scores)."""

    name = PREFIX

    def __init__(self, config, encoders, tokenizer, *, mesh=None, rules=None):
        from sama_jax import inference

        section = config.eval.edit_scores
        if encoders.vae is None or encoders.text_encoder is None:
            raise ValueError(
                "eval.edit_scores edits videos, so it needs the VAE and the text encoder, but "
                f"data.features={list(config.data.features)} means the run did not load them: "
                "leave edit_scores out of eval.evaluators or give the run those encoders"
            )
        self.cases = held_out_cases(
            section.num_cases, section.seed, section.frames, section.height, section.width
        )
        # config.eval's sampler, steps, guidance and shift, config.prompt_prefix, the model's count of
        # semantic tokens; the cases' own size and the same noise seed at every step.
        self.settings = inference.settings_from_config(
            config,
            seed=int(section.seed),
            max_frames=int(section.frames),
            height=int(section.height),
            width=int(section.width),
            exact_size=True,
        )
        self.vae, self.text_encoder, self.tokenizer = encoders.vae, encoders.text_encoder, tokenizer
        self.sample_images = int(section.sample_images)
        # An edit is one video (two with CFG): its batch replicates instead of following the
        # training batch rule, which would split 2 over the data and fsdp axes.
        self.mesh = mesh
        self.rules = None if rules is None else (("batch", None),) + tuple(rules)

    def run(self, dit, step: int) -> Iterator[tuple[str, float]]:
        from sama_jax import inference

        del step  # the same cases and noise at every step
        # A new Editor is cheap: its compiled sampling loop is cached per DiT structure.
        editor = inference.Editor(
            dit, self.vae, self.text_encoder, self.tokenizer, mesh=self.mesh, rules=self.rules
        )
        yield from score_cases(
            lambda frames, text: editor.edit(frames, text, self.settings).frames,
            self.cases,
            sample_images=self.sample_images,
        )
