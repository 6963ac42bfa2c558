"""The three layers import downwards only: the library (``minidiff.*``) knows neither the study
(``minidiff.study``) nor the surfaces (``minidiff.apps``), and the study knows no surface.

Every import of every module is read with :mod:`ast`, those inside functions included, relative
ones resolved against the importing module's package; ``importlib.import_module("...")`` and
``__import__("...")`` with a literal name count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "minidiff"
LAYERS = ("library", "study", "apps")  # bottom to top


def module_name(path: Path, root: Path | None = None) -> str:
    """``src/minidiff/apps/cli/common.py`` -> ``minidiff.apps.cli.common``."""
    root = root or PACKAGE
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str | None:
    """The layer of a ``minidiff`` module, None for anything outside the package."""
    parts = module.split(".")
    if parts[0] != "minidiff":
        return None
    if len(parts) > 1 and parts[1] in ("study", "apps"):
        return parts[1]
    # `python -m minidiff` is the CLI's entry point: a surface that lives at the top
    return "apps" if parts[1:2] == ["__main__"] else "library"


def imported_names(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, name)`` of every module ``source`` (the text of ``module``) may import. ``from
    a import b`` yields ``a`` and ``a.b`` (``b`` may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module"
                   or getattr(node.func, "id", None) in ("import_module", "__import__"))):
            out.append((node.lineno, node.args[0].value))
    return out


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """``"line N imports NAME (LAYER)"`` for each import of ``source`` into a higher layer."""
    here = LAYERS.index(layer(module))
    bad = []
    for line, name in imported_names(source, module, is_package):
        there = layer(name)
        if there is not None and LAYERS.index(there) > here:
            bad.append(f"line {line} imports {name} ({there})")
    return list(dict.fromkeys(bad))


def test_no_module_imports_a_higher_layer():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20 and any("apps" in f.parts for f in files)  # the walk found the tree
    problems = []
    for f in files:
        module = module_name(f)
        for msg in upward_imports(f.read_text(), module, f.name == "__init__.py"):
            problems.append(f"{f.relative_to(PACKAGE.parents[1])} ({layer(module)}): {msg}")
    assert not problems, ("imports that point up a layer (library < study < apps); move the "
                          "shared code down instead:\n" + "\n".join(problems))


def test_layers_of_module_names():
    assert module_name(PACKAGE / "apps" / "cli" / "__init__.py") == "minidiff.apps.cli"
    assert module_name(PACKAGE / "unet.py") == "minidiff.unet"
    assert [layer(m) for m in ("minidiff", "minidiff.unet", "minidiff.study.report",
                               "minidiff.apps.cli.common", "minidiff.__main__", "torch")] == [
        "library", "library", "study", "apps", "apps", None]


@pytest.mark.parametrize("source, module, flagged", [
    ("from .apps import bench", "minidiff.metrics", "minidiff.apps"),
    ("from . import study", "minidiff.unet", "minidiff.study"),
    ("def f():\n    from .study.report import preset_table", "minidiff.unet",
     "minidiff.study.report"),
    ("import minidiff.apps.serve", "minidiff.train", "minidiff.apps.serve"),
    ("from minidiff import apps", "minidiff.data", "minidiff.apps"),
    ("import importlib\nimportlib.import_module('minidiff.study')", "minidiff.data",
     "minidiff.study"),
    ("from ..apps.cli import main", "minidiff.study.pipeline", "minidiff.apps.cli"),
    ("from .. import apps", "minidiff.study.report", "minidiff.apps"),
])
def test_checker_flags_an_upward_import(source, module, flagged):
    bad = upward_imports(source, module)
    assert bad and any(f"imports {flagged} " in b for b in bad), bad


@pytest.mark.parametrize("source, module, is_package", [
    ("from .diffusion import Schedule\nimport torch", "minidiff.samplers", False),
    ("from ..unet import UNet\nfrom . import pipeline", "minidiff.study.recipes", False),
    ("from . import pipeline", "minidiff.study", True),  # the package's own submodule
    ("from ...study import run_study\nfrom ..common import x", "minidiff.apps.cli.commands",
     False),
    ("from .apps.cli import main", "minidiff.__main__", False),
])
def test_checker_passes_downward_and_sideways_imports(source, module, is_package):
    assert upward_imports(source, module, is_package) == []


def test_relative_imports_resolve_against_the_package():
    names = [n for _, n in imported_names("from .. import unet\nfrom .x import y",
                                          "minidiff.study.report")]
    assert names == ["minidiff", "minidiff.unet", "minidiff.study.x", "minidiff.study.x.y"]
    names = [n for _, n in imported_names("from .cli import main", "minidiff.apps", True)]
    assert names == ["minidiff.apps.cli", "minidiff.apps.cli.main"]
