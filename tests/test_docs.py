"""The docs stand on their own (issue 25): nothing in the repository sends a reader to files outside it, and the
README's and docs' links to files of the repository resolve."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders of the workplace these sessions ran in; a user's clone has neither.
OUTSIDE = ("shared/" + "research/", "shared/" + "spec/")
SKIP_DIRS = {".git", "__pycache__", "build", "dist", ".pytest_cache", "runs", ".venv"}
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _text_files():
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if path.is_file() and not parts & SKIP_DIRS and not any(p.endswith(".egg-info") for p in parts) \
                and path.suffix in {".py", ".md", ".txt", ".toml", ".yaml", ".yml", ".cfg", ".sh", ""}:
            yield path


def test_nothing_points_outside_the_repository():
    found = []
    for path in _text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        found += [f"{path.relative_to(ROOT)}: {needle}" for needle in OUTSIDE if needle in text]
    assert not found, found


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_local_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor of the same page
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


def test_algorithms_page_is_the_spec_the_code_cites():
    """erpo's code says "spec section N"; docs/algorithms.md holds those numbered sections."""
    headings = re.findall(r"^## (\d)\. ", (ROOT / "docs" / "algorithms.md").read_text(encoding="utf-8"), re.M)
    assert headings[:4] == ["1", "2", "3", "4"]
