"""sama-precompute: frozen-encoder features for a dataset, written next to the data, so training on a
pod need not run the 5.7B umT5 encoder (or SigLIP, or the VAE) at every step.

    sama-precompute --config=configs/stage1_sft.py:wan_14b \\
        --text-encoder ckpt/umt5 --tokenizer ckpt/google/umt5-xxl
        [--siglip ckpt/siglip] [--vae ckpt/wan_vae]
        [--manifest data/x.jsonl ...]        # default: every manifest of config.data.mixture
        [--batch-size 8] [--dtype float32|float16] [--prompt-prefix "..."] [--overwrite]

Layout (feature_path): <manifest dir>/features/<manifest stem>/<name>/<quoted sample id>.npy, one
array per sample and feature, plus <name>/settings.json recording what produced them:
    text            (L, dim) umT5 last hidden state of prompt_prefix + text, cut to its true length L
                    (<= text_len); pad with zeros to text_len (pad_text) for the DiT
    semantic        (N * (g*g + 1), hidden) SigLIP semantic tokens of the target's anchor frames
    target_latents  (1+k, H/8, W/8, 16) normalised Wan VAE latents of the target
    source_latents  the same for the source (edit samples only)
Frames are exactly what the training pipeline makes of the sample (sama_jax.data.pipeline.
prepare_sample with this config: 4k+1 frames from frame 0, the source's aspect bucket, resize and
centre crop), so stored features line up with the decoded video. Raw t2v clips under motion
alignment get a random source and a task-token prompt per step: their text and source latents
cannot be precomputed (their target latents and semantic tokens can).

Every file is written atomically (temporary file + rename). Rerunning skips features already on
disk, so an interrupted run resumes; settings.json must match the current run (else an error, or
--overwrite recomputes). An item that fails (missing, corrupt or too-short media...) is reported with
its id and path and skipped; a summary ends the run. Exit status: 0 all done, 1 some items failed,
2 bad arguments, config, manifest or settings (nothing computed for that manifest).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Sequence

import numpy as np
from flax import nnx

from sama_jax import cli, conditioning, edit_rules, features, interrupts
from sama_jax import encoders as encoders_lib
from sama_jax import text as text_lib
from sama_jax.data import pipeline
from sama_jax.progress import Progress

log = logging.getLogger(__name__)

FEATURES = features.NAMES
MEDIA_FEATURES = features.MEDIA_NAMES
feature_path = features.feature_path
settings_path = features.settings_path
pad_text = features.pad_text


def save_atomic(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


def check_settings(manifest_path: str, name: str, settings: dict, overwrite: bool) -> None:
    """Records the settings of a feature directory, or refuses to mix in features made otherwise."""
    path = settings_path(manifest_path, name)
    if os.path.exists(path) and not overwrite:
        with open(path) as f:
            stored = json.load(f)
        if stored != settings:
            diff = {
                k: (stored.get(k), settings.get(k))
                for k in set(stored) | set(settings)
                if stored.get(k) != settings.get(k)
            }
            raise ValueError(
                f"{os.path.dirname(path)} holds '{name}' features made with other "
                f"settings (stored, now): {diff}; pass --overwrite to recompute them"
            )
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


class Precomputer:
    """Loads the encoders once (sama_jax.encoders, the run's precision policy) and writes the
    features of one manifest at a time."""

    def __init__(
        self,
        config,
        text_encoder: str | None,
        tokenizer: str | None,
        siglip: str | None,
        vae: str | None,
        batch_size: int = 8,
        dtype: str = "float32",
        prompt_prefix: str | None = None,
        overwrite: bool = False,
    ):
        self.config = config
        self.batch_size = batch_size
        self.dtype = np.dtype(dtype)
        self.overwrite = overwrite
        # Installed by the command; until then never requested.
        self.stop = interrupts.StopRequest("sama-precompute", "writing the batch in flight, then stopping")
        self.text_len = int(config.model.text_encoder.text_len)
        self.prompt_prefix = config.prompt_prefix if prompt_prefix is None else prompt_prefix
        # Deterministic per-sample frames: the training transform without the random pretext.
        spec = pipeline.SampleSpec.from_config(
            config.data, seed=int(config.seed), anchor_frames=int(config.model.semantic.num_anchor_frames)
        )
        self.spec = dataclasses.replace(spec, pretext=None)
        paths = {"text_encoder": text_encoder, "siglip": siglip, "vae": vae}
        names = tuple(name for name, path in paths.items() if path)
        if not names:
            raise ValueError("nothing to compute: give --text-encoder, --siglip and/or --vae")
        if text_encoder and not tokenizer:
            raise ValueError("--text-encoder needs --tokenizer (the local umT5 tokenizer directory)")
        self.tokenizer = text_lib.load_tokenizer(tokenizer) if text_encoder else None
        self.encoders = encoders_lib.load(config, paths, names=names)
        self._encode_text = nnx.jit(conditioning.encode_text)
        self._encode_video = nnx.jit(conditioning.encode_video)
        self._encode_semantic = nnx.jit(conditioning.encode_semantic, static_argnums=2)
        self.settings = {}
        if text_encoder:
            self.settings["text"] = dict(
                checkpoint=os.path.abspath(text_encoder),
                text_len=self.text_len,
                tokenizer=os.path.abspath(tokenizer),
                prompt_prefix=self.prompt_prefix,
                dtype=self.dtype.name,
            )
        media = dict(
            num_frames=self.spec.num_frames,
            frame_stride=self.spec.frame_stride,
            fps=self.spec.fps,
            buckets=[list(b) for b in self.spec.buckets],
        )
        if siglip:
            self.settings["semantic"] = dict(
                checkpoint=os.path.abspath(siglip),
                dtype=self.dtype.name,
                **dict(config.model.semantic),
                **media,
            )
        if vae:
            for name in ("target_latents", "source_latents"):
                self.settings[name] = dict(checkpoint=os.path.abspath(vae), dtype=self.dtype.name, **media)

    def run(self, manifest_path: str) -> Summary:
        source = pipeline.ManifestSource(manifest_path)
        for name, settings in self.settings.items():
            check_settings(manifest_path, name, settings, self.overwrite)
        summary = Summary(manifest_path, len(source))
        records = [source[i] for i in range(len(source))]
        name = os.path.basename(manifest_path)
        if "text" in self.settings:
            self._run_text(manifest_path, records, summary, Progress(len(records), unit="texts", logger=log))
        media_names = [n for n in MEDIA_FEATURES if n in self.settings]
        if media_names:
            progress = Progress(len(records), unit="samples", logger=log)
            for record in records:
                if self.stop.requested:
                    break
                self._run_media(manifest_path, record, media_names, summary)
                progress.advance(what=f"{name} {'+'.join(media_names)}: ")
        return summary

    def _todo(self, manifest_path: str, record: dict, name: str, summary: Summary) -> str | None:
        """The feature's path if it still has to be computed, else None (counted as done)."""
        path = feature_path(manifest_path, record["id"], name)
        if os.path.exists(path) and not self.overwrite:
            summary.already_done[name] += 1
            return None
        return path

    def _run_text(
        self, manifest_path: str, records: list[dict], summary: Summary, progress: Progress
    ) -> None:
        todo = [(r, p) for r in records if (p := self._todo(manifest_path, r, "text", summary))]
        progress.advance(len(records) - len(todo))
        for start in range(0, len(todo), self.batch_size):
            if self.stop.requested:
                break
            chunk = todo[start : start + self.batch_size]
            texts = [edit_rules.with_prefix(str(r["text"]), self.prompt_prefix) for r, _ in chunk]
            # One compiled shape: the last chunk is padded with empty prompts.
            texts += [""] * (self.batch_size - len(texts))
            try:
                ids, mask = text_lib.tokenize(self.tokenizer, texts, self.text_len)
                context = np.asarray(self._encode_text(self.encoders.text_encoder, ids, mask))
            except Exception as e:  # noqa: BLE001 - a tokenizer/encoder failure fails these items only
                for record, _ in chunk:
                    summary.fail(record, "text", "", e)
                progress.advance(len(chunk))
                continue
            for (_, path), hidden, length in zip(chunk, context, mask.sum(axis=1)):
                save_atomic(path, hidden[:length].astype(self.dtype))
                summary.written["text"] += 1
            progress.advance(len(chunk), what=f"{os.path.basename(manifest_path)} text: ")

    def _run_media(self, manifest_path: str, record: dict, names: list[str], summary: Summary) -> None:
        paths = {}
        for name in names:
            if name == "source_latents" and record["kind"] == "t2v":
                continue  # the source of a raw clip is made at train time (motion alignment)
            if path := self._todo(manifest_path, record, name, summary):
                paths[name] = path
        if not paths:
            return
        try:
            sample = pipeline.prepare_sample(record, 0, self.spec)
        except Exception as e:  # noqa: BLE001 - reported with id and path, then skipped
            # The pipeline wraps media errors with the field (source/target) they came from.
            field = getattr(e, "field", "target")
            summary.fail(record, ",".join(paths), record.get(field, ""), getattr(e, "error", e))
            return
        for name, path in paths.items():
            try:
                if name == "semantic":
                    value = self._encode_semantic(
                        self.encoders.siglip, sample["anchors"][None], self.encoders.semantic
                    )[0]
                else:
                    frames = sample["target" if name == "target_latents" else "source"]
                    value = self._encode_video(self.encoders.vae, frames[None])[0]
                save_atomic(path, np.asarray(value, np.float32).astype(self.dtype))
                summary.written[name] += 1
            except Exception as e:  # noqa: BLE001
                summary.fail(record, name, record.get("target", ""), e)


@dataclasses.dataclass
class Summary:
    """What one manifest's run did: features written and already on disk by name, failed items."""

    manifest: str
    samples: int
    written: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    already_done: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failed: list = dataclasses.field(default_factory=list)

    def fail(self, record: dict, features: str, path: str, error: Exception) -> None:
        item = dict(
            id=str(record.get("id")),
            features=features,
            path=str(path),
            error=f"{type(error).__name__}: {error}",
        )
        self.failed.append(item)
        log.warning(
            "precompute: %s failed for %s (%s): %s", features, item["id"], item["path"], item["error"]
        )

    def report(self) -> str:
        lines = [
            f"{self.manifest}: {self.samples} samples; written {dict(self.written)}; "
            f"already done {dict(self.already_done)}; failed {len(self.failed)}"
        ]
        lines += [f"  FAILED {f['id']} [{f['features']}] {f['path']}: {f['error']}" for f in self.failed]
        return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sama-precompute", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--manifest",
        action="append",
        default=[],
        help="manifest (JSONL); repeatable; default: the config's data mixture",
    )
    parser.add_argument("--text-encoder", help="umT5 params checkpoint (convert-wan-weights --kind umt5)")
    parser.add_argument("--tokenizer", help="local umT5 tokenizer directory")
    parser.add_argument("--siglip", help="SigLIP params checkpoint: writes semantic tokens")
    parser.add_argument("--vae", help="Wan VAE params checkpoint: writes target/source latents")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per umT5 call")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "float16"), help="stored dtype of the features"
    )
    parser.add_argument(
        "--prompt-prefix", default=None, help="prepended to every text (default: config.prompt_prefix)"
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute features already on disk")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run("sama-precompute", lambda: _main(*cli.parse(build_parser(), argv)))


def _main(config, args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifests = args.manifest or [entry["manifest"] for entry in config.data.mixture]
    start = time.time()
    worker = Precomputer(
        config,
        args.text_encoder,
        args.tokenizer,
        args.siglip,
        args.vae,
        batch_size=args.batch_size,
        dtype=args.dtype,
        prompt_prefix=args.prompt_prefix,
        overwrite=args.overwrite,
    )
    # Ctrl-C / SIGTERM: the batch in flight is written, then the run stops (a rerun resumes).
    worker.stop.install()
    summaries = [worker.run(path) for path in manifests if not worker.stop.requested]
    worker.stop.restore()
    failed = sum(len(s.failed) for s in summaries)
    for s in summaries:
        print(s.report())
    if worker.stop.requested:
        print(
            f"sama-precompute: stopped by signal {worker.stop.name}; features written so far are kept, "
            "rerun the same command to continue"
        )
        return worker.stop.exit_code
    print(f"sama-precompute: done in {time.time() - start:.1f}s, {failed} failed item(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
