import os

import pytest
from helpers import link_tiny_dataset

from sama_jax import smoke

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


@pytest.mark.slow
def test_smoke_run_composes_data_encoders_and_dit(tmp_path, monkeypatch, capsys, tiny_dataset):
    link_tiny_dataset(tiny_dataset, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert smoke.main([f"--config={CONFIGS}/stage0_pretrain.py:tiny", "--steps=2"]) == 0
    out = capsys.readouterr().out
    assert "step 1:" in out and "loss_semantic=" in out and "'total': 0" in out
    assert os.path.exists(tmp_path / "data" / "synthetic" / "tokenizer" / "spiece.model")
