"""jaxvlm: JAX/Flax vision-language models (LLaVA, Qwen-VL families) for research at pod scale."""
from setuptools import find_packages, setup

# Pinned: key layouts, M-RoPE plumbing and config schemas moved between releases
# (transformers 5.x, jax 0.10 mesh defaults), so the tested set is the installed set.
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "einops==0.8.2",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",   # undeclared dependency of tfds builders
    "pycocotools==2.0.11",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "pillow==13.0.0",               # image processors need it; nothing else pulls it in
    "numpy==2.4.6",
    "tqdm==4.70.1",
    "tiktoken==0.14.0",             # Qwen-VL-Chat tokenizer
    "nltk==3.10.4",                 # CHAIR
    "pycocoevalcap==1.2",           # METEOR / BLEU / ROUGE-L / CIDEr
    "matplotlib==3.11.2",           # attention-map and logit-lens PNGs
]
# The PyTorch reference. Exactly 2.13.0: a looser pin can pull a multi-GB CUDA build.
TORCH = ["torch==2.13.0"]
TEST = TORCH + ["pytest==9.2.0", "peft==0.21.2"]

setup(
    name="jaxvlm",
    version="0.1.0",
    description="Pure-functional Flax ports of LLaVA and Qwen-VL with per-layer introspection, "
                "HF conversion both ways, sharded training and decoding.",
    packages=find_packages(include=["jaxvlm", "jaxvlm.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={"torch": TORCH, "test": TEST},
    entry_points={"console_scripts": ["jaxvlm=jaxvlm.cli:main"]},
)
