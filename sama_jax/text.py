"""Text pipeline for the umT5 encoder, as Wan2.1 runs it.

    tokenizer = load_tokenizer("ckpt/google/umt5-xxl")        # a local directory, never a hub id
    ids, mask = tokenize(tokenizer, ["[Video edit] Make the cat blue."], text_len=512)
    context = encode(model, ids, mask)                        # (B, 512, 4096), zero past each length

Cleaning (Wan's `whitespace_clean(basic_clean(text))`): ftfy.fix_text, html.unescape twice, strip,
collapse whitespace runs to one space. Tokenizing: special tokens added (the closing </s>), padded
to text_len with the pad id, truncated to text_len. The encoder attends only to real tokens and its
outputs past the true length are set to zero, which is what the DiT's cross-attention sees (the
official pipeline slices to the length and zero-pads back to text_len).
"""

from __future__ import annotations

import html
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def clean_text(text: str) -> str:
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(path: str):
    """transformers tokenizer from a local directory (tokenizer.json and/or spiece.model + configs).

    transformers 5.x's T5Tokenizer(vocab_file=...) silently ignores the file, so the directory is
    always loaded with AutoTokenizer.from_pretrained, offline."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer directory not found: {path} (pass the local directory "
            "holding the umT5 tokenizer files, e.g. <wan root>/google/umt5-xxl)"
        )
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load a tokenizer from this directory: {e}") from e


def tokenize(tokenizer, texts: Sequence[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts, cleaned, tokenized, padded/truncated -> ids, mask: int32 (B, text_len) each."""
    if isinstance(texts, str):
        raise TypeError("tokenize takes a sequence of texts, not one string")
    batch = tokenizer(
        [clean_text(t) for t in texts],
        padding="max_length",
        truncation=True,
        max_length=text_len,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="np",
    )
    return batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)


def seen_by_encoder(tokenizer, text: str, text_len: int) -> tuple[str, int, int]:
    """-> (the part of `text` the encoder sees, its token count, the whole text's token count).
    tokenize keeps text_len tokens, the end token included: a longer text loses its tail."""
    ids = tokenizer([clean_text(text)], add_special_tokens=True)["input_ids"][0]
    if len(ids) <= text_len:
        return text, len(ids), len(ids)
    return tokenizer.decode(ids[: text_len - 1], skip_special_tokens=True), text_len, len(ids)


def encode(model, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """umT5 last hidden state with every position past the true length set to zero."""
    hidden = model(jnp.asarray(ids), jnp.asarray(mask))
    return hidden * (jnp.asarray(mask)[..., None] > 0).astype(hidden.dtype)


class TextEncoder:
    """Tokenizer + umT5 encoder behind one call: texts -> (B, text_len, dim) and true lengths.

    The encoder is jitted once per batch size (the sequence length is always text_len)."""

    def __init__(self, model, tokenizer, text_len: int | None = None):
        from flax import nnx

        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len or model.cfg.text_len
        self._encode = nnx.jit(encode)

    def __call__(self, texts: Sequence[str]) -> tuple[jax.Array, np.ndarray]:
        ids, mask = tokenize(self.tokenizer, texts, self.text_len)
        return self._encode(self.model, ids, mask), mask.sum(axis=1)


def build_sentencepiece_tokenizer(texts: Sequence[str], path: str, vocab_size: int) -> str:
    """Trains a small umT5-style sentencepiece tokenizer (unigram; pad 0, eos 1, unk 2) on `texts`
    and writes a directory `load_tokenizer` reads: spiece.model + tokenizer_config.json.

    For tests and the synthetic demo, where no released tokenizer may be downloaded."""
    import io
    import json

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([clean_text(t) for t in texts]),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(
            dict(
                tokenizer_class="T5Tokenizer",
                extra_ids=0,
                model_max_length=512,
                pad_token="<pad>",
                eos_token="</s>",
                unk_token="<unk>",
            ),
            f,
        )
    return path
