"""Test harness: 8 simulated CPU devices for every test, fp32 matmuls, fixed seeds.

XLA_FLAGS must be set before jax is imported anywhere, so it happens here at import time of the
conftest, which pytest loads before any test module.
"""

import fcntl
import os
import random
import shutil
import tempfile

# The tests' programs are tiny and each is compiled more often than it runs: XLA's CPU backend
# without its expensive LLVM passes compiles them 1.5-3x faster (the tiny VAE's training step: 88-100 s
# -> 29-59 s on a loaded 2-core machine) and computes the same numbers (the parity tests hold).
# Commands a test starts inherit the flags.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Parity tests compare fp32 against PyTorch; keep XLA's CPU matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Never reach a model hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# One persistent compilation cache per test run, shared by the xdist workers and every command a
# test starts: the tiny models compile the same programs in many tests and processes (a second
# sama-smoke run: 82 s -> 17 s). A fresh run starts cold, so CI and a local run see the same.
# Set in the pytest process (or xdist's controller); the workers it starts inherit the variable.
CACHE_DIR = os.path.join(tempfile.gettempdir(), f"sama-jax-test-jax-cache-{os.getpid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Files made once per test run and shared the same way (the tiny presets' generated dataset).
SHARED_DIR = os.environ.setdefault(
    "SAMA_TEST_SHARED_DIR", os.path.join(tempfile.gettempdir(), f"sama-jax-test-shared-{os.getpid()}")
)
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from model_helpers import write_tiny_models  # noqa: E402

from sama_jax import config as config_lib  # noqa: E402
from sama_jax import encoders  # noqa: E402

# Seed policy: every test starts from the same global seeds; a test that needs randomness derives it
# from the `seed` fixture (or `rng` for numpy), never from time or test order.
SEED = 0


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(SEED)
    np.random.seed(SEED)
    try:
        import torch

        torch.manual_seed(SEED)
    except ImportError:
        pass
    yield


@pytest.fixture(scope="session")
def tiny_dataset() -> str:
    """A `data` directory holding data/synthetic of the tiny presets (training split, held-out split,
    tokenizer), generated once per test run for every xdist worker and command (it costs minutes on
    2 cores). Link it as `data` into a command's working directory: helpers.link_tiny_dataset."""
    os.makedirs(SHARED_DIR, exist_ok=True)
    data = os.path.join(SHARED_DIR, "tiny", "data")
    with open(os.path.join(SHARED_DIR, "tiny.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker generates, the other waits and reuses
        if not os.path.exists(os.path.join(data, "done")):
            config = config_lib.build_config(f"{CONFIGS}/stage1_sft.py:tiny")
            encoders.ensure_tiny_dataset(config, os.path.join(data, "synthetic"))
            open(os.path.join(data, "done"), "w").close()
    return data


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Random tiny DiT, VAE and umT5 checkpoints, a tokenizer and mp4 sources (model_helpers.
    write_tiny_models), made once per worker for the sama-edit and sama-export tests: (root, flags)."""
    return write_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture
def seed() -> int:
    return SEED


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


def pytest_collection_modifyitems(session, config, items):
    """Modules that hold slow tests run first, each module kept together: with xdist's --dist
    loadscope (.ci/run) a module's fixtures (a trained run, a compiled step) are made on one worker
    only, and the long modules start early instead of ending the run alone on one worker."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)  # stable: order within a module kept


def pytest_configure(config):
    assert jax.device_count() == 8, (
        f"tests expect 8 simulated CPU devices, got {jax.device_count()}: jax was imported before "
        "tests/conftest.py set XLA_FLAGS"
    )


def pytest_sessionfinish(session, exitstatus):
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        shutil.rmtree(CACHE_DIR, ignore_errors=True)
        shutil.rmtree(SHARED_DIR, ignore_errors=True)
