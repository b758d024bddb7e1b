"""Make `erpo.kernels` importable from a plain checkout.

An install (normal or editable) maps the repository folder `kernels/` to `erpo.kernels` through
`package_dir` in setup.py. A checkout used without installing (`PYTHONPATH=.`, running from the repo root)
has no such mapping, so we register the same folder under the same name here. Either way one folder of
source is imported: there is no second copy of the kernels. A checkout imported ahead of an install of another
checkout (a git worktree on PYTHONPATH, with main installed editable) maps its own `kernels/`, never the
installed one: erpo and its kernels always come from the same tree.
"""
import importlib.util
import os
import sys


def ensure_kernels_package() -> None:
    if "erpo.kernels" in sys.modules:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "kernels")
    # A checkout: setup.py beside erpo/ and erpo's own kernels (in site-packages `kernels/` is Hugging Face's).
    is_checkout = os.path.exists(os.path.join(root, "setup.py")) and os.path.exists(
        os.path.join(folder, "logprobs_entropy.py"))
    if not is_checkout and importlib.util.find_spec("erpo.kernels") is not None:
        return
    init = os.path.join(folder, "__init__.py")
    if not os.path.exists(init):
        raise ImportError(
            "erpo.kernels not found: install erpo (`pip install -e .`) or run from a checkout that has kernels/"
        )
    spec = importlib.util.spec_from_file_location("erpo.kernels", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["erpo.kernels"] = module
    spec.loader.exec_module(module)
