"""Docs, configs and code comments are self-contained: they cite what is in the repository.

No path outside the repository (`../`, `/tmp`, `/work/`), no citation of the retired external
design note, no words about the environment the project is developed in; and every
"ARCHITECTURE.md section N" names a section that exists. This file itself is not scanned.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()
DOCS = ("README.md", "ARCHITECTURE.md", "BENCHMARKS.md", "RELIABILITY.md", "SECURITY.md")
CODE_DIRS = ("serving/", "experts/", "router/", "scripts/")

DESIGN_NOTE = r"\bDESIGN\.md\b"
# (pattern, what it is), case-insensitive. A space in a pattern also matches a line break and a
# comment's "#", so that wrapped phrases are found too.
FORBIDDEN = [
    (r"\.\./", "path outside the repository"),
    (r"(?<![\w.~-])/tmp\b", "temporary path: use tempfile or a repo-relative default"),
    (r"(?<![\w.~-])/work/", "path outside the repository"),
    (DESIGN_NOTE, "external design note: cite ARCHITECTURE.md"),
    (r"development vm", "development environment"),
    (r"\bthis vm\b", "development environment"),
    (r"another session", "development environment"),
    (r"other session's", "development environment"),
    (r"another engineer", "development environment"),
    (r"where moe-serve is developed", "development environment"),
    (r"lent to this task", "development environment"),
]
# A citation may wrap onto the next line, past a comment's "#".
CITATION = re.compile(r"ARCHITECTURE\.md,?[\s#]+section\s+(\d+)", re.IGNORECASE)
HEADING = re.compile(r"^##\s+(\d+)\.\s", re.MULTILINE)


def tracked_files() -> list[str]:
    """Files git tracks, plus ARCHITECTURE.md (new files are untracked until committed)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    files = {f for f in out.split("\0") if f} | {"ARCHITECTURE.md"}
    return sorted(f for f in files if (REPO / f).is_file())


def scanned(files: list[str]) -> list[str]:
    """The docs, every config, and the Python files of the product and its scripts."""
    return [
        f
        for f in files
        if f in DOCS or f.startswith("configs/") or (f.endswith(".py") and f.startswith(CODE_DIRS))
    ]


def read(path: str) -> str:
    return (REPO / path).read_text(encoding="utf-8", errors="replace")


def find(pattern: re.Pattern[str], path: str) -> list[tuple[str, re.Match[str]]]:
    """('path:line: matched text', match) for every match of pattern in the file."""
    text = read(path)
    return [
        (f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {' '.join(m.group(0).split())}", m)
        for m in pattern.finditer(text)
    ]


def compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern.replace(" ", r"[\s#]+"), re.IGNORECASE)


def test_docs_configs_and_code_cite_nothing_outside_the_repository():
    found = [
        (path, match.start(), f"{where} ({why})")
        for path in scanned(tracked_files())
        for pattern, why in FORBIDDEN
        for where, match in find(compiled(pattern), path)
    ]
    hits = [hit for *_, hit in sorted(found)]  # in file order
    assert not hits, "outside references or development-environment talk:\n" + "\n".join(hits)


def test_no_test_cites_the_external_design_note():
    note = compiled(DESIGN_NOTE)
    tests = [f for f in tracked_files() if f.startswith("tests/") and f != THIS]
    hits = [where for path in tests for where, _ in find(note, path)]
    assert not hits, "cite ARCHITECTURE.md instead:\n" + "\n".join(hits)


def test_every_architecture_section_cited_exists():
    architecture = read("ARCHITECTURE.md")
    sections = {int(n) for n in HEADING.findall(architecture)}
    assert 7 in sections, "ARCHITECTURE.md: the Ray facts are section 7, which code cites"
    hits, cited = [], 0
    for path in tracked_files():
        for where, match in find(CITATION, path) if path != THIS else []:
            cited += 1
            if int(match.group(1)) not in sections:
                hits.append(f"{where} (sections there: {sorted(sections)})")
    assert not hits, "citations of missing ARCHITECTURE.md sections:\n" + "\n".join(hits)
    assert cited >= 5, f"only {cited} citations found: is the pattern still right?"
