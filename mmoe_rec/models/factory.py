"""Build a model from a class path and keyword arguments: how configs, checkpoints and the registry name a model."""
from __future__ import annotations

import importlib
from typing import Any

from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.models.base import MultiTaskModel


def import_class(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"model class path {class_path!r} must be 'package.module.ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"model class path {class_path!r}: module {module_name!r} not found ({e})") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ValueError(f"model class path {class_path!r}: {module_name} has no class {class_name!r}") from None


def build_model(class_path: str, feature_spec: FeatureSpec, init_args: dict[str, Any] | None = None) -> MultiTaskModel:
    cls = import_class(class_path)
    if not (isinstance(cls, type) and issubclass(cls, MultiTaskModel)):
        raise ValueError(f"{class_path} is not a mmoe_rec MultiTaskModel")
    return cls(feature_spec, **(init_args or {}))


def class_path_of(model: MultiTaskModel) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"
