"""A model package on disk: weights, the FeatureSpec it was trained with, and how to rebuild the model.

    DIR/model.json   {"format": 1, "class_path": ..., "init_args": {...}}
    DIR/spec.json    the FeatureSpec (scoring applies exactly this transform; it never refits)
    DIR/weights.pt   the model's state_dict
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.models.base import MultiTaskModel
from mmoe_rec.models.factory import build_model, class_path_of

PACKAGE_FORMAT = 1


def save_package(model: MultiTaskModel, init_args: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write the package to a temporary folder beside `directory`, then rename it into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists():
        raise FileExistsError(f"model package {directory} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        meta = {"format": PACKAGE_FORMAT, "class_path": class_path_of(model), "init_args": init_args}
        (tmp / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        model.feature_spec.save(tmp / "spec.json")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, tmp / "weights.pt")
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_package(directory: str | os.PathLike) -> MultiTaskModel:
    """Rebuild the model from a package, in eval mode on the CPU."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "model.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} is not a model package (no model.json)") from None
    if meta.get("format") != PACKAGE_FORMAT:
        raise ValueError(f"{directory}/model.json: package format {meta.get('format')} is not supported")
    spec = FeatureSpec.load(directory / "spec.json")
    model = build_model(meta["class_path"], spec, meta["init_args"])
    state = torch.load(directory / "weights.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
