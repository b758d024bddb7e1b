"""Distribution `erpo`.

The Triton kernels live in the top-level folder `kernels/` of the repository but are installed as
`erpo.kernels`: the bare import name `kernels` belongs to Hugging Face's `kernels` package (transformers
probes it), so erpo must never claim it. `erpo/__init__.py` maps the same folder for a plain checkout.
"""
import os
import shutil

from setuptools import find_packages, setup

TRAIN = ["transformers>=4.50", "tokenizers", "safetensors", "rich", "math-verify>=0.9", "pyyaml", "matplotlib", "datasets",
         "scipy"]
BENCH = ["matplotlib", "psutil", "pytest-benchmark"]
# The peers erpo's parity tests and integrations run against (tests/peers, erpo/integrations), pinned. Liger and
# verl need --no-deps on a CPU machine (their requirements pull a CUDA torch, Ray, vLLM, ...): .ci/run installs
# them that way; this extra lists what pip can resolve without replacing torch.
PEERS = ["trl==1.16.0", "hydra-core==1.3.8", "omegaconf==2.3.1", "codetiming==1.4.0", "tensordict==0.15.3", "orjson"]


def cuda_extension() -> dict:
    """setup() arguments for the optional CUDA extension `erpo._C` (csrc/), or {} for a pure-Python install.

    Built when torch is a CUDA build and nvcc is found, or when ERPO_BUILD_CUDA=1 (then a missing
    requirement is an error, not a silent skip); ERPO_BUILD_CUDA=0 never builds it. torch must be importable
    at build time, so a build that wants it runs without build isolation, against the machine's own torch:
    `ERPO_BUILD_CUDA=1 pip install -e . --no-build-isolation`. A plain `pip install -e .` builds in an
    isolated environment without torch, hence without the extension (backend="cuda" then says how to build it).
    """
    wanted = os.environ.get("ERPO_BUILD_CUDA", "")
    if wanted == "0":
        return {}
    forced = wanted == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as err:
        if forced:
            raise RuntimeError(
                "ERPO_BUILD_CUDA=1 needs torch at build time: install a CUDA build of torch, then "
                "`ERPO_BUILD_CUDA=1 pip install -e . --no-build-isolation`"
            ) from err
        return {}
    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    has_nvcc = nvcc is not None and os.path.exists(nvcc)
    if torch.version.cuda is None or not has_nvcc:
        if forced:
            raise RuntimeError(
                f"ERPO_BUILD_CUDA=1 but the CUDA extension cannot be built here: torch {torch.__version__} "
                f"{'is a CPU build' if torch.version.cuda is None else 'is a CUDA build'}, "
                f"nvcc {'found' if has_nvcc else 'not found (put it on PATH or set CUDA_HOME)'}. "
                "It needs a CUDA build of torch and nvcc."
            )
        return {}
    here = os.path.dirname(os.path.abspath(__file__))
    extension = CUDAExtension(
        name="erpo._C",
        sources=["csrc/binding.cpp", "csrc/logprobs_entropy.cu", "csrc/policy_loss_token.cu"],
        include_dirs=[os.path.join(here, "csrc")],
        # Never --use_fast_math: the kernels' NaN/inf tests (x != x, x == inf) must not be folded away.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="erpo",
    version="0.1.0",
    description="Fused logits kernels and a lean trainer for entropy-regulated RL of language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["erpo", "erpo.*"]) + ["erpo.kernels"],
    package_dir={"erpo": "erpo", "erpo.kernels": "kernels"},
    package_data={"erpo.train": ["recipes/*.yaml"]},
    # No triton pin: a CUDA torch brings the triton it was built with, and the install must not replace it.
    # CPU machines install it from requirements-cpu.txt (see README).
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"train": TRAIN, "bench": BENCH, "test": ["pytest>=8"] + TRAIN + BENCH, "peers": PEERS},
    entry_points={"console_scripts": ["erpo=erpo.cli:main"]},
    **cuda_extension(),
)
