"""Dataset registry: `@register_dataset`, `list_datasets`, `get_dataset`, `create_dataset`."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type] = {}

# Modules that register the built-in datasets; imported lazily so that the registry works
# even when only ``datasets.registry`` was imported.
_BUILTIN_MODULES = (
    "datasets.oxford_pet",
    "datasets.synthetic",
    "datasets.voc",
    "datasets.synthetic_voc",
)

T = TypeVar("T", bound=type)


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def register_dataset(cls: T) -> T:
    """Class decorator: register a dataset class under its ``name`` class attribute.

    Args:
        cls: the dataset class; ``cls.name`` must be a non-empty string.

    Returns:
        The class, unchanged.

    Raises:
        ValueError: missing name, or the name is taken by another class.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty class attribute `name`")
    key = _normalise(name)
    previous = _REGISTRY.get(key)
    if previous is not None and previous.__qualname__ != cls.__qualname__:
        raise ValueError(f"dataset name {name!r} already registered by {previous.__qualname__}")
    _REGISTRY[key] = cls
    return cls


def list_datasets() -> list[str]:
    """Names of every registered dataset, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_dataset(name: str) -> type:
    """The dataset class registered under ``name``.

    Hyphens and case are ignored, so ``oxford-pet`` finds ``oxford_pet``.

    Raises:
        KeyError: unknown name; the message lists the valid names.
    """
    _load_builtins()
    key = _normalise(name)
    if key not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; valid: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def create_dataset(name: str, root: str | Path | None = None, **params: Any) -> Any:
    """Build a dataset object by registry name.

    Args:
        name: a registered name (see :func:`list_datasets`).
        root: the dataset folder; ``None`` lets the class choose its default location.
        **params: constructor parameters of that class (e.g. ``label="species"``,
            ``preset="tiny"``).

    Returns:
        The dataset object (an ``OxfordPet`` or subclass).
    """
    cls = get_dataset(name)
    return cls(root=root, **params)
