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


# Private parts of Ray and DeepSpeed move between releases without notice. Where no public API
# does the job, one module per dependency holds the hook (each with a test in
# tests/test_private_hooks.py that fails when an upgrade moves what it touches); nothing else
# names them.
PRIVATE_HOOKS = {
    "launch/_ray_hooks.py": ("ray._private", "global_worker_stdstream_dispatcher"),
    "bigmodel/engine/_deepspeed_hooks.py": (
        "deepspeed.runtime.torch_autocast",
        "TORCH_AUTOCAST_",
        "__compatible_ops__",
    ),
}
"""The allowed private imports and names, by the one module that may use them."""


def _is_private(name: str) -> bool:
    """``ray._private.worker``, ``deepspeed.runtime._x``: a private module of Ray or DeepSpeed."""
    root, *parts = name.split(".")
    return root in ("ray", "deepspeed") and any(p.startswith("_") for p in parts)


def test_private_hooks_live_in_their_one_module():
    offenders = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        allowed = PRIVATE_HOOKS.get(rel, ())
        text = path.read_text()
        for module, names in PRIVATE_HOOKS.items():
            if module != rel:
                offenders += [f"{rel} names {n} (only {module} may)" for n in names if n in text]
        for name in set(_imports(path)):
            if _is_private(name) and not name.startswith(allowed):
                offenders.append(f"{rel} imports {name}: a private module (hooks: {PRIVATE_HOOKS})")
    assert not offenders, "\n".join(sorted(offenders))


def test_rule_checker_sees_imports(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("from ray.train import report\nimport deepspeed.comm\n")
    names = set(_imports(src))
    assert {"ray.train.report", "deepspeed.comm"} <= names
