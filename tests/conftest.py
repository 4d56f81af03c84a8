"""Test harness: 8 simulated CPU devices for every test, fp32 matmuls, fixed seeds.

XLA_FLAGS must be set before jax is imported anywhere, so it happens here at import time of the
conftest, which pytest loads before any test module.
"""

import os
import random
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
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

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

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


@pytest.fixture
def seed() -> int:
    return SEED


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


def pytest_configure(config):
    assert jax.device_count() == 8, (
        f"tests expect 8 simulated CPU devices, got {jax.device_count()}: jax was imported before "
        "tests/conftest.py set XLA_FLAGS"
    )


def pytest_sessionfinish(session, exitstatus):
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        shutil.rmtree(CACHE_DIR, ignore_errors=True)
