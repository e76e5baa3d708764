"""The public surface: explicit, sorted, documented, and shown under its public path."""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable

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


def _public_callables() -> list[tuple[str, Callable[..., object]]]:
    """Every public function, and every public method and property of a public class."""
    found: list[tuple[str, Callable[..., object]]] = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for attribute in module.__all__:
            value = getattr(module, attribute)
            if inspect.isfunction(value):
                found.append((f"{module_name}.{attribute}", value))
            elif inspect.isclass(value):
                for name, member in vars(value).items():
                    function = member.fget if isinstance(member, property) else member
                    if not name.startswith("_") and inspect.isfunction(function):
                        found.append((f"{module_name}.{attribute}.{name}", function))
    return found


def _classes_in(annotation: object) -> set[type]:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return {annotation}
    return {cls for argument in typing.get_args(annotation) for cls in _classes_in(argument)}


def _evaluated(annotation: object, function: Callable[..., object]) -> object:
    if not isinstance(annotation, str):
        return annotation
    namespace = dict(vars(typing))
    namespace.update(getattr(function, "__globals__", {}))
    return eval(annotation, namespace)  # the library's own annotations


def _signature_classes(function: Callable[..., object]) -> set[type]:
    """The classes that `function` takes or returns (a `**options` names keywords: not one)."""
    signature = inspect.signature(function)
    annotations = [signature.return_annotation] + [
        parameter.annotation
        for parameter in signature.parameters.values()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    return {
        cls
        for annotation in annotations
        if annotation is not inspect.Parameter.empty
        for cls in _classes_in(_evaluated(annotation, function))
    }


def test_every_type_a_public_call_takes_or_returns_is_public() -> None:
    """A public call takes and returns only types that a public module exports (or not rdzv's)."""
    exported = {
        id(getattr(importlib.import_module(name), attribute))
        for name in PUBLIC_MODULES
        for attribute in importlib.import_module(name).__all__
    }
    private = sorted(
        f"{where} uses {cls.__qualname__}"
        for where, function in _public_callables()
        for cls in _signature_classes(function)
        if cls.__module__.startswith("rdzv") and id(cls) not in exported
    )
    assert private == []
