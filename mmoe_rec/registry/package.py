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

from mmoe_rec.data.batch import Batch
from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.models.base import MultiTaskModel
from mmoe_rec.models.factory import build_model, class_path_of
from mmoe_rec.output_dir import missing_parents, remove_empty_folders

PACKAGE_FORMAT = 1
PACKAGE_FILES = ("model.json", "spec.json", "weights.pt")  # what a package holds, what rebuilds its model


def probe_batch(spec: FeatureSpec, rows: int = 8) -> Batch:
    """A fixed batch of valid ids and dense values for `spec` (one id per bag), to compare two models' scores."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(0)
    features = spec.sparse_features
    values = torch.cat([torch.randint(0, f.num_embeddings, (rows,), generator=g) for f in features]) if features \
        else torch.zeros(0, dtype=torch.int64)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f.name for f in features], values=values,
                                              lengths=torch.ones(len(features) * rows, dtype=torch.int64))
    return Batch(sparse=kjt, dense=torch.randn(rows, spec.dense_dim, generator=g), labels={})


def check_rebuilds(model: MultiTaskModel, init_args: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """The package's class path, init_args and weights rebuild a model that scores as `model` does: init_args that
    leave out a setting (a gate temperature, an activation) would load without a word and score otherwise."""
    try:
        rebuilt = build_model(class_path_of(model), model.feature_spec, init_args)
        rebuilt.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"the init_args {init_args} do not rebuild this {type(model).__name__}: {e}") from None
    param = next(model.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    rebuilt = rebuilt.to(dtype).eval()
    modes = {module: module.training for module in model.modules()}  # each restored (a frozen part stays eval)
    probe = probe_batch(model.feature_spec)
    try:
        with torch.no_grad():
            mine = model.eval()(probe.to(device)).logits
            theirs = rebuilt(probe).logits
    finally:
        for module, training in modes.items():
            module.training = training
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    for task, logit in mine.items():
        diff = float((logit.float().cpu() - theirs[task].float()).abs().max())
        if not diff <= tolerance * (1 + float(logit.float().abs().max())):
            raise ValueError(f"the init_args {init_args} rebuild a {type(model).__name__} that scores otherwise "
                             f"(task {task!r}: logits up to {diff:.3g} apart on a probe batch): pass every argument "
                             "the model was built with")


def _umask() -> int:
    """The process's umask, read without setting it where Linux tells it (os.umask sets it, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_package(model: MultiTaskModel, init_args: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write the package to a temporary folder beside `directory`, then rename it into place. `init_args` must
    rebuild `model` (checked: the rebuilt model scores a probe batch as `model` does)."""
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"model package {directory} already exists")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    check_rebuilds(model, init_args, state)
    made = missing_parents(directory)  # removed again if the package is not written
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # a folder as mkdir makes it (mkdtemp's is the owner's only): scorers read it
        meta = {"format": PACKAGE_FORMAT, "class_path": class_path_of(model), "init_args": init_args}
        (tmp / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        model.feature_spec.save(tmp / "spec.json")
        torch.save(state, tmp / "weights.pt")
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty_folders(made)
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
