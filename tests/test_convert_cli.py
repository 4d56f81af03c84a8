"""convert-wan-weights as users run it: output checks before converting, recoverable replacement
(killed at every step), one-line errors with exit status 2, dtype/NaN checks, progress, and large
parameters written layer by layer (same checkpoint as the in-memory path)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convert_wan_weights import cli, progress
from convert_wan_weights import dit as convert_dit
from sama_jax import params_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(
    dim=32,
    ffn_dim=48,
    num_layers=2,
    text_dim=16,
    freq_dim=8,
    in_dim=4,
    out_dim=4,
    patch_size=(1, 2, 2),
    semantic_dim=12,
    semantic_hidden_dim=20,
    num_segments=3,
)
FC1 = ("blocks", "ffn", "fc1", "kernel")


def write_dit(path, seed=0, change=None):
    """A tiny SAMA DiT state dict (official keys) as one safetensors file."""
    gen = torch.Generator().manual_seed(seed)
    state = {
        key: torch.randn(shape, generator=gen) * 0.1
        for key, shape in convert_dit.expected_shapes(CFG).items()
    }
    state.update(change or {})
    save_file(state, str(path))
    return state


def convert(src, out, *extra):
    return cli.main([str(src), str(out), "--num-heads", "2", "--dtype", "float32", *extra])


def fc1(out):
    params, _ = params_io.load_params(str(out), expected_kind="wan_dit")
    return np.asarray(params["blocks"]["ffn"]["fc1"]["kernel"])


def leftovers(folder, out):
    return sorted(
        name
        for name in os.listdir(folder)
        if name.startswith(os.path.basename(out)) and name != os.path.basename(out)
    )


@pytest.fixture
def two_versions(tmp_path):
    states = [write_dit(tmp_path / f"v{i}.safetensors", seed=i) for i in (1, 2)]
    return [tmp_path / f"v{i}.safetensors" for i in (1, 2)], [
        np.stack([s[f"blocks.{i}.ffn.0.weight"].numpy().T for i in range(2)]) for s in states
    ]


# A kill (os._exit, no cleanup of any kind) after each step of putting the new checkpoint in place.
KILL = """
import os, sys
from sama_jax import params_io
from convert_wan_weights import cli
params_io._after_step = lambda step: os._exit(17) if step == sys.argv[1] else None
sys.exit(cli.main(sys.argv[2:]))
"""


# The gap between the two renames runs in the quick loop; every other step with the slow tests.
@pytest.mark.parametrize(
    "step",
    [
        pytest.param(step, marks=() if step == "moved_old" else pytest.mark.slow)
        for step in ("written", "journal", "moved_old", "moved_new", "deleted_old")
    ],
)
def test_overwrite_killed_at_any_step_keeps_a_checkpoint_and_a_rerun_finishes(tmp_path, two_versions, step):
    (v1, v2), (fc1_v1, fc1_v2) = two_versions
    out = tmp_path / "ckpt"
    assert convert(v1, out) == 0
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL,
            step,
            str(v2),
            str(out),
            "--num-heads",
            "2",
            "--dtype",
            "float32",
            "--overwrite",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == 17, killed.stderr
    # Before the journal the old checkpoint is the one; from it on, the new one (found through
    # the journal while neither is at OUT).
    np.testing.assert_array_equal(fc1(out), fc1_v1 if step in ("written", "journal") else fc1_v2)
    assert leftovers(tmp_path, out), "the kill should have left something to clean up"
    assert convert(v1, out, "--overwrite") == 0
    np.testing.assert_array_equal(fc1(out), fc1_v1)
    assert leftovers(tmp_path, out) == []


def test_rerun_cleans_what_the_previous_version_left(tmp_path, two_versions):
    (v1, v2), (fc1_v1, fc1_v2) = two_versions
    out = tmp_path / "ckpt"
    assert convert(v1, out) == 0
    assert convert(v2, tmp_path / "new") == 0
    # Killed between its renames: OUT moved to OUT.old, the finished OUT.replacement not yet at OUT.
    os.rename(out, str(out) + ".old")
    os.rename(tmp_path / "new", str(out) + ".replacement")
    np.testing.assert_array_equal(fc1(str(out) + ".replacement"), fc1_v2)
    assert convert(v1, out, "--overwrite") == 0  # was: Directory not empty: OUT -> OUT.old
    np.testing.assert_array_equal(fc1(out), fc1_v1)
    assert leftovers(tmp_path, out) == []


def test_output_problems_are_found_before_the_input_is_read(tmp_path, capsys):
    missing_input = str(tmp_path / "never_read.safetensors")
    regular = tmp_path / "file"
    regular.write_text("x")
    assert convert(missing_input, regular, "--overwrite") == 2
    assert "is not a checkpoint directory" in capsys.readouterr().err
    assert regular.read_text() == "x"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert convert(missing_input, folder, "--overwrite") == 2
    assert "is not a params checkpoint; --overwrite only replaces one" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "mine"
    assert convert(missing_input, folder) == 2
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert convert(missing_input, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err == f"convert-wan-weights: checkpoint not found: {missing_input}\n"


def test_not_a_pytorch_file_is_named_as_such(tmp_path, capsys):
    junk = tmp_path / "random.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    assert cli.main([str(junk), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"convert-wan-weights: {junk} is not a PyTorch checkpoint (zip or legacy pickle format)\n"
    assert not os.path.exists(tmp_path / "out")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this ran",))


def test_a_pickle_that_would_run_code_is_refused_in_one_plain_line(tmp_path, capfd):
    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": _RunsCode()}, str(evil))
    assert cli.main([str(evil), str(tmp_path / "out")]) == 2
    out, err = capfd.readouterr()
    assert "this ran" not in out
    assert err == (
        f"convert-wan-weights: {evil}: refused: it would import posix.system; only plain tensor state "
        "dicts are read (torch.load weights_only=True)\n"
    )
    assert not os.path.exists(tmp_path / "out")


def test_legacy_pickle_checkpoints_still_read(tmp_path):
    from sama_jax.tensor_source import TensorSource

    torch.save(
        {"w": torch.arange(6.0).reshape(2, 3)},
        str(tmp_path / "legacy.pth"),
        _use_new_zipfile_serialization=False,
    )
    source = TensorSource(str(tmp_path / "legacy.pth"))
    np.testing.assert_array_equal(source.read("w", "float32", permute=(1, 0)), np.arange(6.0).reshape(2, 3).T)


def test_nan_warns_with_the_tensor_name_and_integers_are_refused(tmp_path, capsys):
    nan = torch.full((48, 32), 0.1)
    nan[3, 4] = float("nan")
    nan[5, 6] = float("inf")
    write_dit(tmp_path / "nan.safetensors", change={"blocks.1.ffn.0.weight": nan})
    assert convert(tmp_path / "nan.safetensors", tmp_path / "out") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"convert-wan-weights: warning: {tmp_path / 'nan.safetensors'}: tensor "
        "'blocks.1.ffn.0.weight' has 2 NaN/Inf value(s) of 1536"
    ]

    write_dit(
        tmp_path / "int.safetensors", change={"blocks.0.self_attn.q.bias": torch.zeros(32, dtype=torch.int64)}
    )
    assert convert(tmp_path / "int.safetensors", tmp_path / "int_out") == 2
    err = capsys.readouterr().err
    assert "1 tensor(s) hold integers or bools" in err and "blocks.0.self_attn.q.bias (I64)" in err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "int_out")


def test_unknown_head_count_names_the_flag(tmp_path, capsys):
    write_dit(tmp_path / "dit.safetensors")
    assert cli.main([str(tmp_path / "dit.safetensors"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pass --num-heads" in err and len(err.splitlines()) == 1


def test_progress_lines_with_eta(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    monkeypatch.setattr(convert_dit, "GROUP_BYTES", 40_000)  # a few groups and by-rows arrays
    write_dit(tmp_path / "dit.safetensors")
    assert convert(tmp_path / "dit.safetensors", tmp_path / "out") == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if " arrays, " in line]
    assert any("ETA " in line for line in lines)
    total = len(convert_dit.TOP_PARAMS + convert_dit.SAMA_PARAMS + convert_dit.BLOCK_PARAMS)
    assert lines[-1].startswith(f"convert-wan-weights: wan_dit {total}/{total} arrays, ")
    assert lines[-1].endswith(", done")


def test_layers_written_one_at_a_time_give_the_same_checkpoint(tmp_path, monkeypatch):
    write_dit(tmp_path / "dit.safetensors")
    args = ["--num-heads", "2", "--dtype", "bfloat16"]
    assert cli.main([str(tmp_path / "dit.safetensors"), str(tmp_path / "whole")] + args) == 0
    monkeypatch.setattr(convert_dit, "GROUP_BYTES", 0)  # every block parameter through add_by_rows
    assert cli.main([str(tmp_path / "dit.safetensors"), str(tmp_path / "rows")] + args) == 0
    whole = params_io._flatten(params_io.load_params(str(tmp_path / "whole"))[0])
    rows = params_io._flatten(params_io.load_params(str(tmp_path / "rows"))[0])
    assert whole.keys() == rows.keys()
    for key, value in whole.items():
        assert rows[key].dtype == value.dtype
        np.testing.assert_array_equal(np.asarray(rows[key], np.float32), np.asarray(value, np.float32))
