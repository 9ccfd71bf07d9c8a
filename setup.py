"""Installs mimo_jax: MiMo-V2-Flash in JAX/Flax."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.8.0",
    "flax>=0.12.0",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11.0",
    "grain>=0.2.12",
    "array-record>=0.8.1",
    "tensorstore>=0.1.70",
    "ml-collections>=1.1.0",
    "chex>=0.1.90",
    "absl-py>=2.1.0",
    "numpy>=1.26",
    "ml-dtypes>=0.5.0",
    "tokenizers>=0.21.0",
    "safetensors>=0.5.0",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "tqdm>=4.66",
]

EXTRAS = {
    "tpu": ["jax[tpu]>=0.8.0"],
    "gpu": ["jax[cuda12]>=0.8.0"],
    "seqio": ["seqio>=0.0.19"],
    "xm": ["xmanager>=0.6.0"],
    # The parity tests run the reference implementation; torch is pinned to the CPU build.
    # transformers reads FP8 checkpoints through accelerate.
    "test": [
        "pytest>=8.0",
        "pytest-xdist>=3.5",
        "torch==2.13.0",
        "transformers>=5.13",
        "accelerate>=1.0",
        # The notebooks run in the suite, each in a fresh Jupyter kernel.
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
    ],
}

setup(
    name="mimo_jax",
    version="0.1.0",
    description="MiMo-V2-Flash (309B MoE, hybrid SWA/GA attention, MTP, MOPD) in JAX/Flax",
    packages=find_packages(include=["mimo_jax", "mimo_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)
