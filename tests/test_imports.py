"""Every module of the package imports (a module that does not import is caught here, not by a user)."""

import importlib
import pkgutil

import pytest

import qdpo

MODULES = sorted(m.name for m in pkgutil.walk_packages(qdpo.__path__, prefix="qdpo."))


def test_modules_found():
    assert {"qdpo.loss", "qdpo.train", "qdpo.cli", "qdpo.data", "qdpo.model"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)
