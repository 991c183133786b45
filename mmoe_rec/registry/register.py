"""Register a trained model in the MLflow model registry as a pyfunc, and point an alias at it."""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

import mmoe_rec
from mmoe_rec import job_outcome
from mmoe_rec.registry.code_version import CODE_TAG, code_fingerprint
from mmoe_rec.registry.package import load_package, save_package
from mmoe_rec.registry.pyfunc import MultiTaskPyfunc
from mmoe_rec.registry.signature import example_input, model_signature
from mmoe_rec.registry.versions import model_versions
from mmoe_rec.training.tracking import configure_tracking


def register_package(
    package_dir: str | Path,
    name: str,
    alias: str | None = None,
    run_id: str | None = None,
    experiment: str = "mmoe-rec",
) -> tuple[str, str]:
    """Log `package_dir` as a pyfunc model (inside `run_id` if given) and register it. Returns (name, version).

    The logged model is loaded back and scores its input example before a version is made: a package that cannot
    score is an error, with nothing registered and no alias moved (a run of our own ends FAILED). A run given by
    `run_id` (the training run) keeps the status it had: MLflow would end it FINISHED, a FAILED one included."""
    check_model_name(name)
    if alias is not None:
        check_alias(alias)  # the registry refuses it only after the new version exists: a version without its alias
    model = load_package(package_dir)  # fails here, not at serving time, if the package does not load
    spec = model.feature_spec
    tags = {"feature_spec_version": spec.version, "tasks": ",".join(model.tasks), CODE_TAG: code_fingerprint()}
    # a library caller may be inside a run of its own: register's run is nested in it, and the caller's active
    # experiment is left alone (mlflow.set_experiment would move the caller's next runs into ours)
    active = mlflow.active_run()
    if run_id is None:
        run_ctx = mlflow.start_run(experiment_id=experiment_id(experiment), run_name=f"register-{name}",
                                   nested=active is not None)
    else:
        status = MlflowClient().get_run(run_id).info.status
        if active is not None and active.info.run_id == run_id:
            run_ctx = contextlib.nullcontext(active)  # the caller's active run: log into it, leave it running
        else:
            run_ctx = mlflow.start_run(run_id=run_id, nested=active is not None)
    try:
        with run_ctx:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=MultiTaskPyfunc(),
                artifacts={"package": str(package_dir)},
                tags=tags,
                signature=model_signature(spec, tasks=list(model.tasks)),
                input_example=example_input(spec),  # MLflow only warns when it does not score
                pip_requirements=pip_requirements(),
                code_paths=[str(Path(mmoe_rec.__file__).parent)],  # the model loads where mmoe-rec is not installed
            )
            failure = scoring_failure(info.model_uri, spec, list(model.tasks))
            if failure and run_id is None:
                raise RuntimeError(failure)  # inside our own run: it ends FAILED
    finally:
        if run_id is not None:  # whatever happened in it
            MlflowClient().update_run(run_id, status=status)
    if failure:
        raise RuntimeError(failure)
    try:
        version = register_version(info, name, alias, tags)
        job_outcome.done(f"registered {name} version {version}" + (f", alias {alias!r}" if alias else ""))
    except BaseException:  # a failed registration (or a SIGTERM in it) ends our own run FAILED too
        if run_id is None:
            try:
                MlflowClient().set_terminated(info.run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the store failing again: the original error is the one to raise
                pass
        raise
    return name, version


def experiment_id(name: str) -> str:
    """The id of the experiment `name`, made if there is none: what mlflow.set_experiment does, without making it
    this process's active experiment."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # made meanwhile by another process
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise MlflowException(f"the MLflow experiment {name!r} is deleted: restore it (`mlflow experiments restore`) "
                              "or delete it for good (`mlflow gc`) to register into it")
    return found.experiment_id


def register_version(info: Any, name: str, alias: str | None, tags: dict[str, str]) -> str:
    """Registers the logged model `info` as a new version of `name` and points `alias` at it, whole or not at all:
    if this fails part-way (a store error, a SIGTERM raised through it), the version it made is deleted, and the
    registered model too if this call created it and it holds no version (another register may have added one
    meanwhile); the alias is put back where it was if it went with that version (deleting a version deletes its
    aliases), and left alone if it points elsewhere now."""
    client = MlflowClient()
    existed = _registered_model_exists(client, name)
    previous = _alias_version(client, name, alias) if existed and alias else None
    try:
        version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)  # the version's tags
        if alias:
            client.set_registered_model_alias(name, alias, version)
        return version
    except BaseException:
        try:
            _undo_registration(client, name, info, existed)
            # put back only an alias that went with our version: one moved meanwhile (a promote) is someone's choice
            if previous is not None and _alias_version(client, name, alias) is None:
                client.set_registered_model_alias(name, alias, previous)
        except Exception as e:  # noqa: BLE001 - the original error is the one to raise
            print(f"mmoe-rec: could not undo the partial registration of {name!r} ({type(e).__name__}: {e}); check "
                  "the registry for a version without its alias or a model without versions", file=sys.stderr)
        raise


def _registered_model_exists(client: MlflowClient, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None where it points nowhere."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _undo_registration(client: MlflowClient, name: str, info: Any, existed: bool) -> None:
    """Deletes the versions of `name` made from the logged model `info`, then `name` itself if this registration
    created it and no version is left (listed again: another register may have added one meanwhile)."""
    if not existed and not _registered_model_exists(client, name):
        return  # stopped before the registered model was made
    versions = model_versions(client, name)

    def ours(v: Any) -> bool:  # a SQLite store's search gives no model_id: the source names the logged model
        return v.source == info.model_uri or (v.model_id is not None and v.model_id == info.model_id)

    for v in versions:
        if ours(v):
            client.delete_model_version(name, v.version)
    if not existed and not model_versions(client, name):
        client.delete_registered_model(name)


def scoring_failure(model_uri: str, spec, tasks: list[str]) -> str | None:
    """Why the logged pyfunc at `model_uri` does not load and score its one-row input example, or None."""
    example = example_input(spec)
    try:
        scores = mlflow.pyfunc.load_model(model_uri).predict(example)
    except Exception as e:  # whatever the model raises: the version must not be made
        return (f"the logged model does not score its input example ({type(e).__name__}: {e}); nothing was "
                "registered")
    wanted = [f"score_{t}" for t in tasks]
    missing = [c for c in wanted if c not in scores.columns]
    if missing or len(scores) != len(example):
        return (f"the logged model scored its {len(example)}-row input example into {len(scores)} rows with columns "
                f"{list(scores.columns)} (expected {wanted}); nothing was registered")
    return None


def check_model_name(name: str) -> None:
    """A name that `models:/<name>@<alias>` and `models:/<name>/<version>` can address (the registry itself takes
    "a@b" or "a/b", which no model URI then reaches), as a ValueError in one line."""
    if not name.strip() or "@" in name or "/" in name or ("'" in name and '"' in name):
        raise ValueError(f"--name {name!r}: a registered model name needs a character other than a space and must "
                         f"not hold '@' or '/' (models:/<name>@<alias> and models:/<name>/<version> could not name "
                         f"it) or both kinds of quote")


def check_alias(alias: str) -> None:
    """MLflow's own alias rules (allowed characters and length; `latest` in any case and `v<digits>` reserved), as a
    ValueError in one line."""
    from mlflow.exceptions import MlflowException

    try:  # private helpers of MLflow's: a release without them leaves the check to the registry
        from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved
    except ImportError:
        return
    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except MlflowException as e:
        raise ValueError(f"--alias {alias!r}: {e.message}") from None


def promote(name: str, version: str, alias: str) -> None:
    """Move `alias` (e.g. champion) to `version`."""
    check_alias(alias)
    MlflowClient().set_registered_model_alias(name, alias, version)


# What loading and scoring a registered model imports (mmoe_rec itself travels with the model as code). On a
# CPU-only machine torchrec goes in with --no-deps, as `make setup` does: its metadata asks for the CUDA fbgemm-gpu,
# where fbgemm-gpu-cpu is the one that runs (a pip requirements file cannot say --no-deps for one package).
SERVING_DISTRIBUTIONS = ("torch", "fbgemm-gpu-cpu", "torchrec", "tensordict", "pyre-extensions", "numpy", "pandas",
                         "pyarrow", "pyyaml", "psutil", "tqdm", "mlflow")


def pip_requirements() -> list[str]:
    """`name==version` of each serving distribution installed here, without local version tags (torch's "+cpu"
    names a build of one index, not a version pip can resolve elsewhere)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in SERVING_DISTRIBUTIONS:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmoe-rec register", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="Lightning checkpoint written by `mmoe-rec fit`")
    src.add_argument("--package", help="model package folder (model.json, spec.json, weights.pt)")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", default=None, help="alias to point at the new version, e.g. champion")
    p.add_argument("--run-id", default=None, help="log the model inside this MLflow run (default: a new run)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    args = p.parse_args(argv)
    check_model_name(args.name)  # before the checkpoint is read or the store opened
    if args.alias is not None:
        check_alias(args.alias)
    configure_tracking(args.tracking_uri, setting="--tracking-uri")
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package
        if args.checkpoint:
            from mmoe_rec.training.checkpoint_file import check_checkpoint_file
            from mmoe_rec.training.module import MultiTaskModule

            check_checkpoint_file(args.checkpoint)
            module = MultiTaskModule.load_from_checkpoint(args.checkpoint, map_location="cpu")
            package = save_package(module.model, module.model_init_args, Path(tmp) / "package")
        name, version = register_package(package, args.name, alias=args.alias, run_id=args.run_id)
    alias_note = f", alias {args.alias!r}" if args.alias else ""
    print(f"registered {name} version {version}{alias_note}")
    return 0
