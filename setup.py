"""Packaging for rgkd_megatron.

CPU (tests, the embedded default): torch must be the CPU wheel, installed first and pinned
(`pip install torch==2.13.0`); GPU users bring their own CUDA torch (e.g. an NGC container).
megatron-core is a range, the releases CI tests on CPU/gloo (rgkd_megatron/parallel/mcore_version.py:
0.16.1 is the newest with a Python 3.11 wheel, 0.19.2 the newest tested); an existing megatron-core in
that range (an NGC/NeMo container) is kept.
apex is not a pip dependency (the PyPI 'apex' is unrelated): GPU users build NVIDIA apex from
source; it is detected at import time.
One optional C extension, rgkd_megatron.cache._rowdecode (the one-pass CPU decode of q8 teacher-cache
rows): built when a C compiler and the Python headers are present, skipped with a warning otherwise
(the reader then decodes with numpy / torch: the same values, ~2x slower per row on the CPU).
"""

import hashlib

from setuptools import Extension, find_packages, setup

ROWDECODE = "rgkd_megatron/cache/_rowdecode.c"
with open(ROWDECODE, "rb") as f:  # the build records its source, so a stale build is recognised
    ROWDECODE_SHA256 = hashlib.sha256(f.read()).hexdigest()

setup(
    name="rgkd_megatron",
    version="0.1.0",
    description="Reward-guided preference-based knowledge distillation of LLMs on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rgkd_megatron", "rgkd_megatron.*"]),
    ext_modules=[
        Extension(
            "rgkd_megatron.cache._rowdecode",
            [ROWDECODE],
            define_macros=[("ROWDECODE_SOURCE_SHA256", f'"{ROWDECODE_SHA256}"')],
            # -ffp-contract=off: no fused multiply-add, the product and the difference as written
            extra_compile_args=["-O3", "-ffp-contract=off", "-std=c11"],
            optional=True,
        )
    ],
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<=0.19.2",
        "einops>=0.7",
        "numpy>=1.24",
        "packaging",
        "psutil",  # undeclared dependency of megatron-core dist_checkpointing saves (hangs without it)
        "pyyaml>=6",
        "tokenizers>=0.19",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "wandb>=0.17",
        "rouge-score>=0.1.2",
        "matplotlib>=3.7",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.0", "triton>=3.0"],
        "mpi": ["mpi4py>=3.1"],
        "convert": ["gguf>=0.16", "transformers>=4.45"],
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "transformers>=4.45",
            "gguf>=0.16",
            "accelerate>=1.0",
            "triton==3.7.1",  # the version torch 2.13 pins; kernels are tested on CPU under TRITON_INTERPRET=1
        ],
    },
    entry_points={
        "console_scripts": [
            "rgkd-train=rgkd_megatron.cli.train:main",
            "rgkd-distill=rgkd_megatron.cli.distill:main",
            "rgkd-eval=rgkd_megatron.cli.evaluate:main",
            "rgkd-plan=rgkd_megatron.cli.plan:main",
        ]
    },
)
