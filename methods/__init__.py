"""WSSS methods behind one contract (``methods.base``) and one registry.

Importing this package imports every method module, so that each registers itself.
"""

from __future__ import annotations

from methods import (  # noqa: F401  (imported to register the methods)
    box_prior,
    cam,
    cam_affinitynet,
    ccam_ecs,
    references,
    rtc,
    weaktr,
    weaktr_refinery,
)
from methods.base import (
    Context,
    ImageSet,
    Method,
    create_method,
    get_method,
    list_methods,
    register_method,
)

__all__ = [
    "Context",
    "ImageSet",
    "Method",
    "create_method",
    "get_method",
    "list_methods",
    "register_method",
]
