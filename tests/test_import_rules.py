"""Import rules that import-linter cannot express (subpackages of external packages).

DESIGN.md: only launch/ (and tune/, which drives launch/) imports ray.train; only tune/ imports
ray.tune; only bigmodel/engine imports deepspeed (import-linter checks that one too).
"""

import ast
import configparser
import re
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


# --- the layout docs/architecture.md names, and the layers contract of setup.cfg

ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _layout_paths() -> list[str]:
    """The first column of the layout table in docs/architecture.md (``sharding/``, ...)."""
    text = ARCHITECTURE.read_text()
    section = text[text.index("## Layout and the import direction") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)


def _layers_contract() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg["importlinter:contract:bigmodel-layers"]


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def _bigmodel_children() -> set[str]:
    """Packages and modules directly inside bigmodel/ (``data``, ``config``, ...)."""
    pkg = ROOT / "bigmodel"
    dirs = {p.name for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    return dirs | modules


def _name(path: str) -> str:
    """``bigmodel/data/`` -> ``data``, ``bigmodel/config.py`` -> ``config`` (as in the contract)."""
    return path.removeprefix("bigmodel/").rstrip("/").removesuffix(".py")


def test_every_path_of_the_layout_exists():
    paths = _layout_paths()
    assert len(paths) >= 10, f"no layout table found in {ARCHITECTURE}"
    # a layer the contract marks optional, "(name)", is one being created
    optional = {n.strip("()") for n in _lines(_layers_contract()["layers"]) if n.startswith("(")}
    missing = [p for p in paths if not (ROOT / p).exists() and _name(p) not in optional]
    assert not missing, f"docs/architecture.md lists paths that do not exist: {missing}"


def test_every_part_of_bigmodel_is_in_the_layout_and_the_layers():
    listed = {_name(p) for p in _layout_paths()}
    contract = _layers_contract()
    layers = {name.strip("()") for name in _lines(contract["layers"])}
    not_yet_placed = set(_lines(contract.get("exhaustive_ignores", "")))
    children = _bigmodel_children() - not_yet_placed
    assert not children - listed, (
        f"bigmodel/ has {sorted(children - listed)}, which docs/architecture.md does not list"
    )
    assert not children - layers, (
        f"bigmodel/ has {sorted(children - layers)}, which the layers contract in setup.cfg "
        f"does not place"
    )
    doc_layers = [name for name in map(_name, _layout_paths()) if name in layers]
    contract_order = [name.strip("()") for name in _lines(contract["layers"])]
    assert doc_layers == contract_order[::-1], (
        "docs/architecture.md lists bigmodel's rooms bottom-up in the order of the layers "
        f"contract: {contract_order[::-1]}, not {doc_layers}"
    )
