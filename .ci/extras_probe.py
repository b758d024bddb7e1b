"""Import every module an install with only the given extra must carry; exit 1 naming each that fails.

Run by .ci/run in a fresh venv holding `.[train]` only (`python .ci/extras_probe.py train`): a module of the
trainer importing something no extra declares fails here even if the function that imports it never runs in a test.
"""
import importlib
import os
import pkgutil
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
NEEDS_PEERS = ("erpo.integrations.",)  # the TRL and verl drop-ins: `.[peers]` and verl --no-deps


def modules(extra: str) -> list:
    import erpo

    names = ["erpo", "erpo.kernels"] + [m.name for m in pkgutil.walk_packages(erpo.__path__, "erpo.")]
    return sorted(n for n in names if extra == "peers" or not n.startswith(NEEDS_PEERS))


def main(extra: str) -> int:
    failed = []
    for name in modules(extra):
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - every failure is reported, by module
            failed.append(f"{name}: {type(err).__name__}: {err}")
    for line in failed:
        print(f"extras_probe [{extra}]: {line}", file=sys.stderr)
    print(f"extras_probe [{extra}]: {len(modules(extra)) - len(failed)} modules import, {len(failed)} fail")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "train"))
