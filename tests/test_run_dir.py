from sama_jax import run_dir


def test_config_differences_names_changed_leaves_and_ignores_tuple_vs_list():
    old = {"model": {"dit": {"patch_size": [1, 2, 2], "dim": 64}}, "workdir": "a"}
    new = {"model": {"dit": {"patch_size": (1, 2, 2), "dim": 96}}, "workdir": "b"}
    assert run_dir.config_differences(old, new) == ["model.dit.dim: 64 -> 96"]
