"""The layout rules the code keeps (STYLE.md): small modules and functions, mesh axes named only
in sharding.py, student families named only in the registry and their own modules."""

import ast
import pathlib

import pytest

from mcckd_jax import sharding
from mcckd_jax.models import registry

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mcckd_jax"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def _string_constants(tree):
    """String literals outside docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def _relative(path):
    return path.relative_to(PACKAGE.parent).as_posix()


def test_the_package_was_found():
    assert len(MODULES) > 40


@pytest.mark.parametrize("path", MODULES, ids=_relative)
def test_modules_and_functions_are_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{_relative(path)} is over 400 lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, (
                f"{_relative(path)}:{node.lineno} {node.name} has {length} lines")


def test_mesh_axes_are_named_in_sharding_only():
    offenders = [f"{_relative(path)}:{node.lineno} {node.value!r}"
                 for path in MODULES if path.name != "sharding.py"
                 for node in _string_constants(ast.parse(path.read_text()))
                 if node.value in sharding.MESH_AXES]
    assert not offenders


def test_families_are_named_in_the_registry_and_their_modules_only():
    names = set(registry.FAMILIES)
    names |= {t for family in registry.FAMILIES.values() for t in family.model_types}
    own = {"registry.py"} | {f"{family.config_cls.__module__.rsplit('.', 1)[1]}.py"
                             for family in registry.FAMILIES.values()}
    offenders = [f"{_relative(path)}:{node.lineno} {node.value!r}"
                 for path in MODULES if path.name not in own
                 for node in _string_constants(ast.parse(path.read_text()))
                 if node.value in names]
    assert not offenders
