"""Every third-party module erpo's code imports is declared by the install that ships that code.

A missing declaration passes on a warm machine that happens to have the module and fails on a fresh one (scipy
was imported by `erpo compare` and listed by no extra). This reads every import statement, the lazy ones inside
functions included, so it catches what an import-everything probe only catches when the function runs;
`.ci/run` adds the dynamic check (a venv with only the `train` extra imports every module, .ci/extras_probe.py).
"""
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"erpo", "kernels", "bench", "tests"}
# Import name -> distribution name, where they differ.
DISTRIBUTION = {"yaml": "pyyaml", "math_verify": "math-verify", "liger_kernel": "liger-kernel",
                "pytest_benchmark": "pytest-benchmark"}
# Imported only behind an explicit opt-in that names its own install step; each needs a reason.
OPT_IN = {
    "vllm": "--rollout vllm; rollout.py refuses with the install line when vllm is missing",
    "nvidia": "bench/static.py probes the pip CUDA wheels for ptxas and skips without them",
    "huggingface_hub": "a dependency of transformers (same install), used to read its cache",
    "liger_kernel": "a bench peer, installed --no-deps as the README's test command does; skipped when absent",
    "verl": "installed --no-deps by the README's test command (its requirements pull a CUDA torch)",
}


def _setup_lists() -> dict:
    tree = ast.parse((REPO / "setup.py").read_text())
    lists = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            lists[node.targets[0].id] = [ast.literal_eval(item) for item in node.value.elts]
    return lists


def _names(requirements) -> set:
    out = set()
    for spec in requirements:
        for sep in "=<>!~[; ":
            spec = spec.split(sep)[0]
        out.add(spec.lower().replace("_", "-"))
    return out


def _declared(relative: str) -> set:
    """The distributions an install that ships this file provides."""
    lists = _setup_lists()
    cpu = _names(line for line in (REPO / "requirements-cpu.txt").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    base = {"torch", "numpy"} | cpu
    if relative.startswith(("erpo/train/", "erpo/cli.py", "erpo/__main__.py")):
        return base | _names(lists["TRAIN"])
    if relative.startswith("erpo/integrations/"):
        return base | _names(lists["TRAIN"]) | _names(lists["PEERS"])
    if relative.startswith("bench/"):
        return base | _names(lists["BENCH"]) | _names(lists["TRAIN"]) | _names(["pytest"]) | _names(lists["PEERS"])
    return base


def _imports(path: Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - FIRST_PARTY - set(sys.stdlib_module_names) - {"__future__"}


def test_every_import_is_declared_by_its_extra():
    missing = []
    for folder in ("erpo", "kernels", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            declared = _declared(relative)
            for name in sorted(_imports(path)):
                distribution = DISTRIBUTION.get(name, name).lower().replace("_", "-")
                if distribution not in declared and name not in OPT_IN:
                    missing.append(f"{relative} imports {name!r}")
    assert not missing, "undeclared in setup.py's extras: " + "; ".join(missing)


def test_the_check_sees_a_missing_declaration():
    assert "scipy" in _imports(REPO / "erpo" / "train" / "stats.py")
    assert "scipy" not in _declared("erpo/ops/logprobs_entropy.py")  # the core install does not carry it
    assert "orjson" in _names(_setup_lists()["PEERS"])  # verl's tracking module imports it at import time
