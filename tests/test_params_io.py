import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sama_jax import params_io, sharding
from sama_jax.tensor_source import ConversionError, TensorSource, cast, check_keys


def test_incremental_write_then_load_round_trip(tmp_path):
    path = str(tmp_path / "ckpt")
    writer = params_io.ParamsWriter(path, "wan_dit", {"dim": 8, "patch_size": (1, 2, 2)})
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = np.linspace(-1, 1, 8).astype(ml_dtypes.bfloat16)
    writer.add({"blocks": {"a": a}})
    assert not os.path.exists(path), "a checkpoint must not appear before finalize"
    writer.add({"blocks": {"b": b}, "head": {"c": np.ones(3, np.float32)}})
    writer.finalize()
    params, config = params_io.load_params(path, expected_kind="wan_dit")
    assert config == {"dim": 8, "patch_size": [1, 2, 2]}
    np.testing.assert_array_equal(params["blocks"]["a"], a)
    assert params["blocks"]["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(params["blocks"]["b"], np.float32), np.asarray(b, np.float32))


def test_load_onto_a_mesh(tmp_path):
    path = str(tmp_path / "ckpt")
    w = np.arange(64, dtype=np.float32).reshape(8, 8)
    params_io.save_params(path, {"w": w}, "test", {})
    mesh = sharding.create_mesh(dict(ici=dict(fsdp=-1)))
    target = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
    abstract = {"w": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=target)}
    params, _ = params_io.load_params(path, abstract=abstract)
    assert params["w"].sharding == target
    np.testing.assert_array_equal(np.asarray(params["w"]), w)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(params_io.ParamsCheckpointError, match="not found"):
        params_io.load_params(str(tmp_path / "nope"))
    (tmp_path / "junk").mkdir()
    with pytest.raises(params_io.ParamsCheckpointError, match="not a complete Orbax checkpoint"):
        params_io.load_params(str(tmp_path / "junk"))
    path = str(tmp_path / "ckpt")
    params_io.save_params(path, {"w": np.zeros(2, np.float32)}, "wan_vae", {})
    with pytest.raises(params_io.ParamsCheckpointError, match="holds a 'wan_vae' checkpoint"):
        params_io.load_params(path, expected_kind="wan_dit")
    with pytest.raises(params_io.ParamsCheckpointError, match="exists"):
        params_io.ParamsWriter(path, "wan_vae", {})
    params_io.save_params(path, {"v": np.ones(2, np.float32)}, "wan_vae", {}, overwrite=True)
    params, _ = params_io.load_params(path)
    assert set(params) == {"v"}


def test_tensor_source_reads_shards_and_pickles(tmp_path):
    a = torch.randn(3, 4, dtype=torch.bfloat16)
    b = torch.randn(5)
    save_file({"a": a}, str(tmp_path / "m-00001-of-00002.safetensors"))
    save_file({"b": b}, str(tmp_path / "m-00002-of-00002.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {"a": "m-00001-of-00002.safetensors", "b": "m-00002-of-00002.safetensors"},
    }
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    for path in (tmp_path, tmp_path / "m.safetensors.index.json"):
        source = TensorSource(str(path))
        assert sorted(source.keys()) == ["a", "b"] and source.shape("a") == (3, 4)
        np.testing.assert_array_equal(source.get("a"), a.float().numpy())
        np.testing.assert_array_equal(source.get("b"), b.numpy())
    torch.save({"state_dict": {"x.weight": torch.ones(2, 2)}}, str(tmp_path / "p.pth"))
    source = TensorSource(str(tmp_path / "p.pth"))
    assert source.keys() == ["x.weight"]
    np.testing.assert_array_equal(source.get("x.weight"), np.ones((2, 2), np.float32))


def test_tensor_source_errors(tmp_path):
    with pytest.raises(ConversionError, match="not found"):
        TensorSource(str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConversionError, match="bad.safetensors: cannot read safetensors header"):
        TensorSource(str(bad))
    (tmp_path / "i.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(ConversionError, match="shards listed in the index are missing"):
        TensorSource(str(tmp_path / "i.safetensors.index.json"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ConversionError, match="not a .safetensors file"):
        TensorSource(str(tmp_path / "x.txt"))


def test_check_keys_lists_every_problem():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    found = {"a": (3, 2), "c": (1,), "z": (9,)}
    with pytest.raises(ConversionError) as info:
        check_keys("ckpt.safetensors", found, expected)
    message = str(info.value)
    assert "ckpt.safetensors" in message
    assert "missing (1):\n    b" in message
    assert "unexpected (1):\n    z" in message
    assert "a: checkpoint (3, 2), expected (2, 3)" in message
    check_keys("ok", {"a": (2, 3), "c": (1,)}, expected, optional={"b"})


def test_cast():
    x = np.array([1.0, 1.00390625, 3.0], np.float32)
    assert cast(x, "bfloat16").dtype == ml_dtypes.bfloat16
    assert cast(x, "float32").dtype == np.float32
    with pytest.raises(ConversionError, match="unsupported --dtype"):
        cast(x, "int8")


def test_an_interrupted_write_leaves_nothing_and_is_not_merged_later(tmp_path):
    path = str(tmp_path / "ckpt")
    crashed = params_io.ParamsWriter(path, "test", {})
    crashed.add({"stale": np.zeros(2, np.float32)})  # never finalized: the process "died" here
    assert not os.path.exists(path)
    params_io.save_params(path, {"fresh": np.ones(2, np.float32)}, "test", {})
    params, _ = params_io.load_params(path)
    assert set(params) == {"fresh"}


def test_arrays_added_by_rows_load_like_the_others(tmp_path):
    path = str(tmp_path / "ckpt")
    big = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)
    emb = (np.arange(7 * 2, dtype=np.float32).reshape(7, 2) / 8).astype(ml_dtypes.bfloat16)
    asked, written = [], []
    writer = params_io.ParamsWriter(
        path, "test", {"n": 1}, on_written=lambda arrays, nbytes: written.append((arrays, nbytes))
    )
    writer.add({"small": np.ones(3, np.float32)})
    writer.add_by_rows(
        ("blocks", "big"),
        big.shape,
        np.float32,
        lambda start, stop: asked.append((start, stop)) or big[start:stop],
    )
    writer.add_by_rows(("emb",), emb.shape, emb.dtype, lambda start, stop: emb[start:stop], block_rows=3)
    writer.finalize()
    assert asked == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert sum(n for _, n in written) == 12 + big.nbytes + emb.nbytes and sum(a for a, _ in written) == 3
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    params, config = params_io.load_params(path, expected_kind="test")
    assert config == {"n": 1}
    np.testing.assert_array_equal(params["blocks"]["big"], big)
    assert params["emb"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(params["emb"].astype(np.float32), emb.astype(np.float32))
    mesh = sharding.create_mesh(dict(ici=dict(fsdp=-1)))
    target = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = {
        "blocks": {"big": jax.ShapeDtypeStruct(big.shape, np.float32, sharding=target)},
        "emb": jax.ShapeDtypeStruct(emb.shape, emb.dtype, sharding=target),
        "small": jax.ShapeDtypeStruct((3,), np.float32, sharding=target),
    }
    restored, _ = params_io.load_params(path, abstract=abstract)
    np.testing.assert_array_equal(np.asarray(restored["blocks"]["big"]), big)


def test_rows_of_the_wrong_shape_are_refused_and_nothing_is_left(tmp_path):
    path = str(tmp_path / "ckpt")
    with pytest.raises(
        params_io.ParamsCheckpointError, match=r"rows \[0, 1\) have shape \(1, 2\), expected \(1, 3\)"
    ):
        with params_io.ParamsWriter(path, "test", {}) as writer:
            writer.add_by_rows(("w",), (2, 3), np.float32, lambda start, stop: np.zeros((1, 2), np.float32))
            writer.finalize()
    assert os.listdir(tmp_path) == []
