"""Text pipeline: Wan's cleaning, a tokenizer directory loaded offline, padding/truncation, encode."""

import numpy as np
import pytest
import torch
from model_helpers import SENTENCES, make_tokenizer_dir, tiny_hf_umt5
from transformers import AutoTokenizer

from convert_wan_weights import cli
from sama_jax import text
from sama_jax.models import load_text_encoder


def test_clean_text_as_wan():
    assert text.clean_text("  Make\tthe   cat\n\nblue  ") == "Make the cat blue"
    assert text.clean_text("Tom &amp;amp; Jerry") == "Tom & Jerry"  # unescaped twice
    assert text.clean_text("cafÃ© au lait") == "café au lait"  # ftfy repairs mojibake
    assert text.clean_text("\u201cquoted\u201d") == '"quoted"'  # ftfy: curly quotes


def test_pipeline_ids_match_transformers_and_sentencepiece(tmp_path):
    sp = make_tokenizer_dir(tmp_path / "tok")
    tokenizer = text.load_tokenizer(str(tmp_path / "tok"))
    texts = [
        "The red ball   moves left.",
        "Replace the cat &amp; make it caf\u00c3\u00a9-style.",
        " ".join(SENTENCES[:4]),
    ]
    ids, mask = text.tokenize(tokenizer, texts, text_len=24)
    assert ids.shape == mask.shape == (3, 24) and ids.dtype == np.int32

    # Same ids as transformers, called the way the official Wan pipeline calls it on cleaned text.
    reference = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    expected = reference(
        [text.clean_text(t) for t in texts],
        padding="max_length",
        truncation=True,
        max_length=24,
        add_special_tokens=True,
        return_tensors="np",
    )
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])

    # And the same as the sentencepiece model itself: pieces + </s>, then <pad> (0) up to text_len;
    # a text longer than text_len keeps its first 23 pieces and the closing </s>.
    for row, t in enumerate(texts):
        pieces = sp.encode(text.clean_text(t))
        want = (pieces[:23] + [1] + [0] * 24)[:24]
        assert ids[row].tolist() == want, row
        assert mask[row].sum() == min(len(pieces) + 1, 24)
    assert mask[2].sum() == 24 and ids[2, -1] == 1


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        text.load_tokenizer(str(tmp_path / "missing"))
    sp_dir = tmp_path / "tok"
    make_tokenizer_dir(sp_dir)
    with pytest.raises(TypeError, match="sequence of texts"):
        text.tokenize(text.load_tokenizer(str(sp_dir)), "one string", 8)


def test_text_encoder_end_to_end(tmp_path):
    make_tokenizer_dir(tmp_path / "tok")
    reference = tiny_hf_umt5(dropout_rate=0.0).eval()
    reference.save_pretrained(tmp_path / "hf")
    assert (
        cli.main([str(tmp_path / "hf"), str(tmp_path / "enc"), "--kind", "umt5", "--dtype", "float32"]) == 0
    )
    encoder = text.TextEncoder(
        load_text_encoder(str(tmp_path / "enc")), text.load_tokenizer(str(tmp_path / "tok")), text_len=12
    )
    texts = ["The red ball moves left.", "blue cube"]
    context, lengths = encoder(texts)
    assert context.shape == (2, 12, 16)
    ids, mask = text.tokenize(encoder.tokenizer, texts, 12)
    assert lengths.tolist() == mask.sum(1).tolist()
    with torch.no_grad():
        expected = reference(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).last_hidden_state.numpy()
    expected = expected * mask[..., None]
    context = np.asarray(context)
    assert np.all(context[1, lengths[1] :] == 0)
    assert np.abs(context - expected).max() / np.abs(expected).max() < 1e-5
