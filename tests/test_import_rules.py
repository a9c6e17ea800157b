"""Import rules that import-linter cannot express (subpackages of external packages).

DESIGN.md: only launch/ (and tune/, which drives launch/) imports ray.train; only tune/ imports
ray.tune; only bigmodel/engine imports deepspeed (import-linter checks that one too).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bigmodel", "sharding", "launch", "tune")

RULES = {
    "ray.train": ("launch", "tune"),
    "ray.tune": ("tune",),
    "deepspeed": ("bigmodel/engine",),
    # Ray Train's private modules change between releases without notice: public API only
    "ray.train.v2._internal": (),
}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:
                yield f"{node.module}.{alias.name}"


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("module,allowed", RULES.items())
def test_only_allowed_packages_import(module, allowed):
    offenders = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(allowed):
            continue
        for name in _imports(path):
            if name == module or name.startswith(module + "."):
                offenders.append(f"{rel} imports {name}")
    assert not offenders, f"only {allowed} may import {module}:\n" + "\n".join(offenders)


def test_rule_checker_sees_imports(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("from ray.train import report\nimport deepspeed.comm\n")
    names = set(_imports(src))
    assert {"ray.train.report", "deepspeed.comm"} <= names
