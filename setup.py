"""Distribution `erpo`.

The Triton kernels live in the top-level folder `kernels/` of the repository but are installed as
`erpo.kernels`: the bare import name `kernels` belongs to Hugging Face's `kernels` package (transformers
probes it), so erpo must never claim it. `erpo/__init__.py` maps the same folder for a plain checkout.
"""
from setuptools import find_packages, setup

TRAIN = ["transformers>=4.50", "tokenizers", "safetensors", "rich", "math-verify>=0.9", "pyyaml", "matplotlib", "datasets"]
BENCH = ["matplotlib", "psutil", "pytest-benchmark"]

setup(
    name="erpo",
    version="0.1.0",
    description="Fused logits kernels and a lean trainer for entropy-regulated RL of language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["erpo", "erpo.*"]) + ["erpo.kernels"],
    package_dir={"erpo": "erpo", "erpo.kernels": "kernels"},
    # No triton pin: a CUDA torch brings the triton it was built with, and the install must not replace it.
    # CPU machines install it from requirements-cpu.txt (see README).
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"train": TRAIN, "bench": BENCH, "test": ["pytest>=8"] + TRAIN + BENCH},
    entry_points={"console_scripts": ["erpo=erpo.cli:main"]},
)
