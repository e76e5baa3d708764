"""The public surface: explicit, sorted, documented, and shown under its public path."""

from __future__ import annotations

import importlib

import pytest

import rdzv

PUBLIC_MODULES = ["rdzv", "rdzv.testing", "rdzv.torch"]


def _isort_order(name: str) -> tuple[int, str]:
    """Constants first, then classes, then the rest (ruff's RUF022 order)."""
    kind = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return kind, name


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_sorted_and_names_exist(name: str) -> None:
    """Every public module lists its names in a sorted __all__, and each name exists."""
    module = importlib.import_module(name)
    assert module.__all__ == sorted(module.__all__, key=_isort_order)
    for attribute in module.__all__:
        assert hasattr(module, attribute), attribute


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_public_callable_is_documented(name: str) -> None:
    """Every class and function a public module exports has a docstring."""
    module = importlib.import_module(name)
    assert module.__doc__
    for attribute in module.__all__:
        value = getattr(module, attribute)
        if callable(value):
            assert value.__doc__, f"{name}.{attribute} has no docstring"


def test_no_public_name_is_left_out_of_all() -> None:
    """Every name rdzv defines without a leading underscore is in __all__."""
    defined = {
        attribute
        for attribute, value in vars(rdzv).items()
        if not attribute.startswith("_") and getattr(value, "__module__", None) == "rdzv"
    }
    assert defined <= set(rdzv.__all__)


def test_exported_classes_show_their_public_module() -> None:
    """Tracebacks and reprs name rdzv.X, not the private module that defines X."""
    for attribute in rdzv.__all__:
        value = getattr(rdzv, attribute)
        if isinstance(value, type) or callable(value):
            assert value.__module__ == "rdzv", attribute
