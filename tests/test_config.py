import os

import pytest

from sama_jax import presets
from sama_jax.config import ConfigError, load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.mark.parametrize("name", ["stage0_pretrain.py", "stage1_sft.py"])
@pytest.mark.parametrize("preset", presets.PRESET_NAMES)
def test_every_config_loads_with_every_preset(name, preset):
    config, rest = load_config([f"--config={CONFIGS}/{name}:{preset}"])
    assert rest == []
    assert config.model.preset == preset
    assert config.model.dit.to_dict() == presets.DIT[preset]
    assert config.stage == (0 if name.startswith("stage0") else 1)


def test_overrides_are_parsed_to_the_type_they_replace():
    config, rest = load_config(
        [
            f"--config={CONFIGS}/stage0_pretrain.py:tiny",
            "--config.train.batch_size=8",
            "--config.optimizer.lr",
            "3e-4",
            "--config.checkpoint.async_save=true",
            "--config.data.pretext.shuffle_grid=(4,4,4)",
            "--config.workdir=/tmp/x",
            "--other=1",
        ]
    )
    assert config.train.batch_size == 8 and isinstance(config.train.batch_size, int)
    assert config.optimizer.lr == pytest.approx(3e-4)
    assert config.checkpoint.async_save is True
    assert config.data.pretext.shuffle_grid == (4, 4, 4)
    assert config.workdir == "/tmp/x"
    assert rest == ["--other=1"]


def test_14b_preset_has_the_paper_sizes():
    config, _ = load_config([f"--config={CONFIGS}/stage1_sft.py:wan_14b"])
    dit = config.model.dit
    assert (dit.dim, dit.ffn_dim, dit.num_heads, dit.num_layers) == (5120, 13824, 40, 40)
    assert config.model.siglip.hidden_size == 1152 and config.model.text_encoder.dim == 4096


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.bogus=1", "unknown config key 'train.bogus'"),
        ("--config.nosuch.field=1", "unknown config key 'nosuch.field'"),
        ("--config.train.batch_size=abc", "cannot parse as int"),
        ("--config.train=3", "is a section"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([f"--config={CONFIGS}/stage1_sft.py:tiny", override])


def test_missing_file_and_unknown_preset_are_errors():
    with pytest.raises(ConfigError, match="not found"):
        load_config(["--config=configs/does_not_exist.py"])
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        load_config([f"--config={CONFIGS}/stage1_sft.py:huge"])
    with pytest.raises(ConfigError, match="no --config"):
        load_config(["--config.train.steps=1"])


def test_loaded_config_is_locked():
    config, _ = load_config([f"--config={CONFIGS}/stage1_sft.py:tiny"])
    with pytest.raises(AttributeError):
        config.train.new_field = 1


def test_cpu_devices_flag_is_taken_out_and_refused_after_jax_starts():
    from sama_jax.config import simulate_cpu_devices

    assert simulate_cpu_devices(["--config=x.py", "--steps=2"]) == ["--config=x.py", "--steps=2"]
    with pytest.raises(ConfigError, match="before jax starts its backends"):
        simulate_cpu_devices(["--cpu_devices=8", "--config=x.py"])
