"""The house rules the code is held to (ARCHITECTURE.md section 6), checked on the source: which
package may import which, file and function sizes, and no probing of the expert pool."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("serving", "experts", "router")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def offenders(folders: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sources(*folders):
        for name in sorted(imports(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    return bad


@pytest.mark.parametrize(
    ("folders", "forbidden"),
    [
        # Dependencies point one way: cli -> api -> engine -> (experts, router); control observes
        # the engine, and nothing below the CLI imports it.
        (("experts", "router"), ("serving",)),
        (("router",), ("ray", "experts")),
        (("serving/engine",), ("serving.api", "serving.control", "serving.cli", "ray")),
        (("serving/control",), ("serving.api", "serving.cli")),
        (("serving/api",), ("serving.cli",)),
    ],
)
def test_imports_point_one_way(folders, forbidden):
    assert offenders(folders, forbidden) == []


def test_runtime_modules_never_import_the_cli():
    runtime = [REPO / "serving" / "config.py", REPO / "serving" / "errors.py"]
    bad = [str(p) for p in runtime if any(n.startswith("serving.cli") for n in imports(p))]
    assert bad == []


def test_the_expert_math_imports_no_ray():
    """Ray lives at the edges (experts/ray_pool.py, fanout.py, shard_resources.py, serving/)."""
    math = ("ffn.py", "gemm.py", "checkpoint.py", "pool.py", "timing.py", "shard.py")
    paths = [REPO / "experts" / name for name in math]
    assert [str(p) for p in paths if any(n.split(".")[0] == "ray" for n in imports(p))] == []


def test_files_and_functions_stay_small():
    big, long = [], []
    for path in sources(*PACKAGES):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            big.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines}")
    assert big == [] and long == []


def test_nobody_probes_the_expert_pool():
    """The pool is handed to whoever uses it, typed (experts/pool.py ElasticPool): never looked
    up with getattr/hasattr."""
    bad = []
    for path in sources(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and "pool" in ast.unparse(node.args[0]).lower()
            ):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert bad == []
