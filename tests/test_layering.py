"""The house's rules, per wing: the explanation core runs without MLflow and Hydra, and no core
wing imports the wings above it (tracking, comparing, the command)."""

import ast
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "xai_exp"
CORE_WINGS = ("data", "models", "explain", "evaluate", "study", "outputs")
SHARED = ("config", "errors", "files", "cache")  # modules at the top, used by every wing
UPPER_WINGS = ("track", "compare", "app")  # the only ones that may import MLflow or Hydra
FRAMEWORKS = ("mlflow", "hydra", "omegaconf")


def modules(wing: str) -> list[str]:
    return sorted(
        f"xai_exp.{wing}.{path.stem}" if path.stem != "__init__" else f"xai_exp.{wing}"
        for path in (PACKAGE / wing).glob("*.py")
    )


def imported(module: str) -> set[str]:
    """Every module name the source of `module` imports (at any depth)."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = path.with_suffix("") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_every_module_lives_in_a_wing_or_is_shared():
    top = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert top == set(SHARED)
    wings = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert wings == set(CORE_WINGS) | set(UPPER_WINGS)


@pytest.mark.parametrize("wing", [*CORE_WINGS, *UPPER_WINGS])
def test_each_wing_says_what_lives_there_and_what_it_may_import(wing):
    doc = ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text()))
    assert doc
    assert "May import" in doc


@pytest.mark.parametrize("wing", CORE_WINGS)
def test_core_wings_import_no_framework_and_no_upper_wing(wing):
    for module in modules(wing):
        names = imported(module)
        assert not {n for n in names if n.split(".")[0] in FRAMEWORKS}, module
        assert not {
            n for n in names if n.split(".")[:2][-1] in UPPER_WINGS and n.startswith("xai_exp.")
        }, module


def test_shared_modules_import_no_wing_and_no_framework():
    for name in SHARED:
        names = imported(f"xai_exp.{name}")
        assert not {n for n in names if n.split(".")[0] in FRAMEWORKS}, name
        wings = {n.split(".")[1] for n in names if n.startswith("xai_exp.") and n.count(".") >= 1}
        assert not wings & {*CORE_WINGS, *UPPER_WINGS}, name


def test_core_imports_neither_mlflow_nor_hydra_when_loaded():
    core = [m for wing in CORE_WINGS for m in modules(wing)] + [f"xai_exp.{n}" for n in SHARED]
    core.append("xai_exp.compare.method_agreement")  # compare's map store runs without MLflow
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in core)
        + f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FRAMEWORKS!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
