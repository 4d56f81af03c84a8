"""sama_jax: SAMA instruction-guided video editing on Wan2.1, in JAX/Flax NNX.

Install on a fresh machine (Python 3.11, CPU):
    pip install -r requirements.txt -e .
requirements.txt pins the whole stack, test-time references included; install_requires below only
names what the library imports, so the package also installs into an existing JAX environment.
"""

from setuptools import find_packages, setup

setup(
    name="sama_jax",
    version="0.1.0",
    description="SAMA video editing on Wan2.1 in JAX/Flax NNX: models, converters, data, training.",
    python_requires=">=3.11",
    # The converter's folder is tools/convert_wan_weights/; it installs as the package
    # convert_wan_weights (no top-level `tools` package in site-packages to collide with others').
    packages=find_packages(include=["sama_jax", "sama_jax.*"]) + ["convert_wan_weights"],
    package_dir={"convert_wan_weights": "tools/convert_wan_weights"},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "ml-collections>=1.1.0",
        "clu>=0.0.12",
        "absl-py",
        "numpy",
        "safetensors",
        "transformers>=5.0",
        "sentencepiece",
        "ftfy",
        "imageio",
        "imageio-ffmpeg",
        "av",
        "pillow",
        "psutil",
    ],
    extras_require={
        # Parity references and the test runner. torch must be the CPU wheel pinned in requirements.txt.
        "test": ["torch==2.13.0", "diffusers==0.42.1", "pytest", "pytest-xdist"],
    },
    entry_points={
        "console_scripts": [
            "sama-mesh-info=sama_jax.mesh_info:main",
            "sama-smoke=sama_jax.smoke:main",
            "sama-train=sama_jax.train:main",
            "convert-wan-weights=convert_wan_weights.cli:main",
            "sama-make-synthetic=sama_jax.data.synthetic:main",
            "sama-build-shards=sama_jax.data.build_shards:main",
            "sama-import-manifest=sama_jax.data.importers:main",
            "sama-precompute=sama_jax.precompute:main",
            "sama-export=sama_jax.export:main",
            "sama-edit=sama_jax.edit:main",
            "sama-fit-vae=sama_jax.vae_fit:main",
            "sama-demo=sama_jax.demo:main",
            "sama-ablate=sama_jax.ablate:main",
        ],
    },
)
