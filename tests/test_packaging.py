"""An editable install, a normal install and a plain checkout all import the same kernels, as `erpo.kernels`,
and no install ever claims the bare import name `kernels` (Hugging Face's package owns it)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL = "logprobs_entropy.py"

PROBE = (
    "import importlib.util, sys; {prelude}"
    "import erpo, erpo.kernels.{mod} as k; print(k.__file__); "
    "print(importlib.util.find_spec('kernels') is None or 'erpo' not in str(importlib.util.find_spec('kernels').origin))"
)


def _probe(cwd, prelude="", env_path=None):
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"}
    if env_path:
        env["PYTHONPATH"] = env_path
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(prelude=prelude, mod=KERNEL[:-3])],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    kernel_file, no_bare_kernels = out.stdout.split()
    assert no_bare_kernels == "True"
    return Path(kernel_file)


def test_current_install_imports_repo_kernels(tmp_path):
    assert _probe(tmp_path).read_bytes() == (REPO / "kernels" / KERNEL).read_bytes()


def test_checkout_without_install(tmp_path):
    # A copy of the checkout, so the answer cannot come from the editable install of this repo; any installed
    # erpo (editable finders included) is hidden so only the copy on sys.path can answer.
    checkout = tmp_path / "checkout"
    for folder in ("erpo", "kernels"):
        shutil.copytree(REPO / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    prelude = (
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower() "
        "and 'editable' not in repr(f).lower()]; "
        "sys.path[:] = [p for p in sys.path if '__editable__' not in p]; "
        f"sys.path.insert(0, {str(checkout)!r}); "
    )
    assert _probe(tmp_path, prelude=prelude) == checkout / "kernels" / KERNEL


@pytest.mark.slow
def test_normal_install_ships_kernels_inside_erpo(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target", str(target), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr
    assert not (target / "kernels").exists(), "the install claims the bare import name `kernels`"
    installed = (target / "erpo" / "kernels" / KERNEL)
    assert installed.read_bytes() == (REPO / "kernels" / KERNEL).read_bytes()
    assert (target / "erpo" / "train" / "trainer.py").is_file(), "the trainer (erpo train) not shipped"
    assert (target / "erpo" / "train" / "recipes" / "entropy_trap.yaml").is_file(), "built-in recipes not shipped"
    site = ":".join(p for p in sys.path if p.endswith("site-packages"))
    assert _probe(tmp_path, env_path=f"{target}:{site}") == installed


def test_bare_name_kernels_is_never_this_folder(tmp_path):
    """From the checkout's root (cwd first on sys.path, as under `python -m pytest`), `import kernels` must give
    Hugging Face's package when installed (transformers >= 5.25 imports it) or fail as absent — never erpo's."""
    import subprocess
    import sys

    code = ("import importlib.util, os\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError:\n    print('absent')\n"
            "else:\n    print(os.path.dirname(os.path.abspath(kernels.__file__)))\n"
            "import erpo.kernels.logprobs_entropy\nprint('erpo.kernels ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    import os

    where, ok = out.stdout.splitlines()
    assert ok == "erpo.kernels ok"
    assert where == "absent" or os.path.realpath(where) != os.path.realpath(os.path.join(REPO, "kernels"))


def test_checkout_on_path_ahead_of_an_install_maps_its_own_kernels(tmp_path):
    """A second checkout (a git worktree) on PYTHONPATH while this repo is installed: erpo and erpo.kernels both
    come from that checkout, never erpo from one tree and its kernels from the other."""
    checkout = tmp_path / "worktree"
    for folder in ("erpo", "kernels"):
        shutil.copytree(REPO / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "setup.py", checkout / "setup.py")
    assert _probe(tmp_path, env_path=str(checkout)) == checkout / "kernels" / KERNEL
