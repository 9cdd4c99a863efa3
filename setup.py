"""Packaging for alphapo. Tool configuration (pytest) lives in pyproject.toml."""

from setuptools import find_packages, setup

# Triton ships Linux wheels only; elsewhere the package runs on its torch backends.
TRITON = 'triton>=3.3; platform_system == "Linux"'

setup(
    name="alphapo",
    version="0.1.0",
    description="Fused AlphaPO preference loss from hidden states: Triton kernels with no logits in memory",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["alphapo", "alphapo.*"]),
    package_data={"alphapo": ["py.typed"]},
    install_requires=["torch>=2.4", TRITON],
    extras_require={
        "train": ["transformers>=4.45", "safetensors", "tqdm", "matplotlib", "pyyaml", "pyarrow"],
        # The peers the suite compares against (cut-cross-entropy runs on CUDA only).
        "bench": ["pytest-benchmark", "tqdm", "matplotlib", "liger-kernel", "cut-cross-entropy"],
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "trl",
            # TRL's PEFT path (LoRA: the reference is the adapter-disabled policy, the head
            # frozen) is what AlphaPODPOTrainer's LoRA tests exercise; pure Python, and it
            # needs nothing trl/transformers/accelerate do not already pull in.
            "peft",
            "liger-kernel",
            "transformers>=4.45",
            "safetensors",
            "tqdm",
            "matplotlib",
            "pyyaml",
            "pyarrow",
        ],
        # flash-attn builds against CUDA only: install it on a GPU machine.
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["alphapo-train=alphapo.training.cli:main"]},
)
