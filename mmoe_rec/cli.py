"""`mmoe-rec` entry point: LightningCLI for fit / validate / test / predict, plain subcommands for the other jobs."""
from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import importlib.util
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from mmoe_rec import job_outcome
from mmoe_rec.exit_now import exit_now

# subcommand -> "module:function"; each function takes the remaining argv and returns an exit code
JOBS = {
    "synth": "mmoe_rec.data.synthetic:main",
    "features": "mmoe_rec.features.build:main",
    "register": "mmoe_rec.registry.register:main",
    "score": "mmoe_rec.registry.scoring:main",
}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _is_user_error(e: Exception) -> bool:
    """Errors that say what is wrong with the input or the environment (their message is the whole story)."""
    from mmoe_rec.features.errors import FeatureDataError

    tracking = sys.modules.get("mmoe_rec.training.tracking")  # imported by the jobs that talk to MLflow
    unavailable = (tracking.TrackingUnavailable,) if tracking else ()
    ranks = sys.modules.get("mmoe_rec.training.child_ranks")  # another rank failed: its traceback is printed
    unavailable += (ranks.ChildRankFailed,) if ranks else ()
    mlflow_errors = sys.modules.get("mlflow.exceptions")  # e.g. a registered model or alias that does not exist
    registry = (mlflow_errors.MlflowException,) if mlflow_errors else ()
    # a trainer setting Lightning refuses (`--trainer.accelerator gpu` on a CPU machine, `--trainer.devices 0`)
    fabric_errors = sys.modules.get("lightning.fabric.utilities.exceptions")
    registry += (fabric_errors.MisconfigurationException,) if fabric_errors else ()
    # ArgumentError: a config or command-line setting LightningCLI's parser refused (a class path, a key)
    return isinstance(e, (FeatureDataError, ValueError, OSError, argparse.ArgumentError, *unavailable, *registry))


def print_user_error(e: Exception, about: str | None = None) -> None:
    """`error: [<about>: ]<message>` in one line, or the exception raised with its traceback under
    MMOE_REC_TRACEBACK=1."""
    if os.environ.get("MMOE_REC_TRACEBACK"):
        raise e
    print(f"error: {f'{about}: ' if about else ''}{e}\n(MMOE_REC_TRACEBACK=1 shows where it was raised)",
          file=sys.stderr)


def _cause(e: BaseException) -> BaseException | None:
    """The exception `e` was raised from (`raise ... from`), or, for the config parser's errors, the one it was
    raised while handling (jsonargparse wraps a setting's own error that way); none where `raise ... from None`
    replaced it with a clearer message (e.g. "feature spec not found: DIR/spec.json" over "[Errno 2] No such file
    ..."). Another error raised while one was handled is a new one, not its detail: a checkpoint's copy onto a
    read-only folder (EROFS) was reported as the cross-device rename before it (EXDEV), which shutil had handled."""
    if e.__cause__ is not None:
        return e.__cause__
    if e.__suppress_context__ or type(e).__module__.split(".")[0] not in ("jsonargparse", "argparse"):
        return None
    return e.__context__


def _report(e: Exception, argv: list[str] | None = None) -> int:
    """One line for a user error (the most specific one in its chain: jsonargparse wraps a model's own "k must be
    in [1, num_experts]" in a union-type error that dumps the whole config); anything else is raised."""
    if os.environ.get("MMOE_REC_TRACEBACK") or not _is_user_error(e):
        raise e
    chain, seen = [e], {id(e)}
    while (nxt := _cause(chain[-1])) is not None and id(nxt) not in seen:
        chain.append(nxt)
        seen.add(id(nxt))
    innermost = [x for x in chain if isinstance(x, Exception) and _is_user_error(x)][-1]
    key = _parser_key(chain, argv or [])  # jsonargparse's innermost message names the value, not the setting
    message = str(innermost)
    worker = _loader_worker_error(message)
    if worker:  # raised in a DataLoader worker: PyTorch re-raises it with the worker's whole traceback as text
        innermost = ValueError(worker)
    alternative = _union_alternative_error(chain)
    if "Got value: NestedArg(" in message:  # `--x name --x.init_args.k v`: a registered short name takes none
        message = (f"init_args given to a short name ({message[message.index('NestedArg('):]}): a short name such "
                   "as ddp_sharded_embeddings takes none; give the class path instead (--trainer.strategy "
                   "mmoe_rec.training.sharding.ShardedEmbeddingStrategy --trainer.strategy.init_args.<name> <value>)")
        innermost = ValueError(message)
    elif alternative and message.startswith("Expected a <class 'str'>") and "Got value: Namespace(" in message:
        # a class's settings refused by the union's str alternative (the innermost error), which says nothing:
        # the class alternative's own error
        message = alternative
        innermost = ValueError(message)
    required = re.match(r"the following arguments are required: (\w+)\.(data|model)\b", message)
    if required:  # jsonargparse names its internal keys: a model and its data come from a config file
        message = (f"{message} (mmoe-rec {required.group(1)} takes its model and data from a config file: "
                   f"--config configs/<name>.yaml; `mmoe-rec {required.group(1)} --help` lists the settings)")
        innermost = ValueError(message)
    echo = next((m for m in ("Got value: Namespace(", "Given value: Namespace(") if m in message), None)
    if echo:  # the whole sub-config of a class, printed back (jsonargparse's wording varies by version): cut
        innermost = ValueError(message[: message.index(echo)].rstrip(". ") + ".")
    print_user_error(innermost, key if key and not message.startswith(key) else None)
    return 1


def _union_alternative_error(chain: list[BaseException]) -> str | None:
    """jsonargparse's "Does not validate against any of the Union subtypes ... Errors: - Expected a <class 'str'>
    - <the class's own error>": the one error that is not a plain type mismatch (the chain's innermost exception is
    the str alternative's, "Expected a <class 'str'>", which says nothing)."""
    for e in chain:
        text = str(e)
        if "Does not validate against any of the Union subtypes" not in text or "\nErrors:\n" not in text:
            continue
        block = text.split("\nErrors:\n", 1)[1].split("\nGiven value", 1)[0]
        errors: list[str] = []
        for line in block.splitlines():
            if line.startswith("  - "):
                errors.append(line[4:])
            elif errors and line.startswith("    "):  # an entry's continuation
                errors[-1] += " " + line.strip()
        own = [err for err in errors if not re.match(r"Expected a <class '[\w.]+'>", err)]
        if len(own) == 1:
            return own[0]
    return None


def _loader_worker_error(message: str) -> str | None:
    """"Caught ValueError in DataLoader worker process 1.\nOriginal Traceback ...\n<module>.Error: <text>" as
    "<text> (in data loader worker 1)"; None for any other message."""
    m = re.match(r"Caught \w+ in DataLoader worker process (\d+)\.\nOriginal Traceback", message)
    if not m:
        return None
    last = [line for line in message.splitlines() if line and not line[0].isspace()][-1]  # the exception's line
    text = last.split(": ", 1)[1] if ": " in last else last
    return f"{text} (in data loader worker {m.group(1)})"


def _parser_key(chain: list[BaseException], argv: list[str]) -> str | None:
    """The setting a LightningCLI parser error is about, when the chain is a parser's: the `Parser key "..."`s of
    the exception that names the most of them, each nested in the one before through its class's init_args
    (`trainer.max_epochs`; `model`, `model` -> `model.init_args.model`, the option the user wrote). A union type
    (the logger) names its key once per alternative (`trainer.logger`, `log_model`, `log_model`): where the
    command line has the option with the repeat dropped and not the one with it, the repeat is dropped."""
    if not any(isinstance(x, argparse.ArgumentError) for x in chain):
        return None
    keys = max((re.findall(r'Parser key "([^"]+)"', str(x)) for x in chain), key=len)
    if not keys:
        return None
    deduped = [k for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    written = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    full, short = ".init_args.".join(keys), ".init_args.".join(deduped)
    return short if short in written and full not in written else full


class _Terminated(SystemExit):
    """Raised by the SIGTERM handler of `exit_on_sigterm`."""


def _sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise _Terminated(128 + signal.SIGTERM)  # the shell's code for "killed by SIGTERM"


def _end_process(code: int) -> None:
    """End the process with `code` as the interpreter's exit does for the program, without the teardown of every
    module that follows it: with torch, Lightning, MLflow and torchrec loaded that took 2-3 s a process (measured,
    Zen 3 VM), and a 2-process fit paid it twice in a row (rank 0 waits for rank 1's exit code). What the program
    sees of the exit is kept, in the interpreter's order: threading's shutdown (its exit hooks, e.g. one that tells
    idle ThreadPoolExecutor workers to stop, as MLflow's cached artifact download pools are; then the join of
    every non-daemon thread: joining first waited on those idle workers forever), the atexit handlers (MLflow's,
    logging's, multiprocessing's), output flushed."""
    threading._shutdown()
    atexit._run_exitfuncs()
    exit_now(code)


def _stopped_job_message(command: str, done: list[str]) -> str:
    """The last line of a job (synth, features, score, register) that a SIGTERM ended: what it leaves, truly.
    `done`: the steps it completed (job_outcome), e.g. its output written, the SIGTERM held until then."""
    if done:
        return f"mmoe-rec {command}: stopped by SIGTERM once its work was done ({'; '.join(done)})"
    if command == "register":  # the register run, if made, keeps what it logged (a model no version points at)
        return ("error: mmoe-rec register stopped by SIGTERM before it finished: no version was made and no alias "
                "moved (a register run it started is marked FAILED)")
    return f"error: mmoe-rec {command} stopped by SIGTERM before it finished; it left no partial output"


@contextlib.contextmanager
def exit_on_sigterm(message: str | Callable[[], str] | None = None) -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, a scheduler's cancel) ends a job through its cleanup, then the process at once,
    as SIGTERM's default does: without it no `.<output>.tmp-<pid>-<random>` would be removed (nothing removes it
    later: the name is the process's own). The process ends by os._exit once the exception has come through the job: an interpreter
    shutdown while a reader thread is still inside Python (Arrow reading an .xz file through Python's lzma) aborted
    the process. Only where SIGTERM has its default action (a host program's own handler is left alone), and from
    the main thread (the only one that may set handlers); the action before is put back after the job. `message`:
    a line for stderr before the exit (a job that says nothing of its own), or a function that makes it then."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        yield
    except _Terminated as e:
        if message:
            print(message() if callable(message) else message, file=sys.stderr)
        exit_now(e.code)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None, process: bool | None = None) -> int:
    """`process` (default: argv not given, i.e. the `mmoe-rec` command itself): this call is the whole process, so
    it ends the process when the command is done (`_end_process`: the interpreter's exit less its module teardown).
    A job that fails ends it at once (os._exit) once its error is printed and its cleanup has run, without even the
    atexit handlers: in the interpreter's shutdown a CSV reader thread of Arrow still inside Python's read (an .xz
    file abandoned half-way) aborted the process after the error (exit 134, not 1)."""
    process = argv is None if process is None else process
    code = _run(list(sys.argv[1:] if argv is None else argv), process)
    if process:
        _end_process(code)
    return code


def _run(argv: list[str], process: bool) -> int:
    # --help too: the help of these subcommands is built from classes that import torchrec
    needs_torchrec = bool(argv) and argv[0] in (*LIGHTNING_SUBCOMMANDS, "register", "score")
    if needs_torchrec and importlib.util.find_spec("torchrec") is None:  # not declared: pip would pull CUDA fbgemm
        print("error: torchrec is not installed; install it without its dependencies (the CPU fbgemm is pinned): "
              "pip install --no-deps torchrec==1.8.0 (README, \"Two commands\": make setup does it)", file=sys.stderr)
        return 1
    from mmoe_rec import malloc

    malloc.apply_from_env()  # before the first large tensor: training and scoring reuse freed memory
    if argv and argv[0] in JOBS:
        module, func = JOBS[argv[0]].split(":")
        try:
            with job_outcome.collecting() as done, exit_on_sigterm(lambda: _stopped_job_message(argv[0], done)):
                code = int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
        except Exception as e:  # bad input, an unreachable store, a missing file: one line, not a traceback
            code = _report(e, argv)
        if code and process:  # failed (its own report or ours printed, its cleanup done): end the process now
            exit_now(code)
        return code
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        # the imports take seconds, before the job's own SIGTERM watch (a SIGTERM there killed it without a word)
        with exit_on_sigterm(f"error: mmoe-rec {argv[0]} stopped by SIGTERM before it started"):
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            from mmoe_rec.training.cli import run_lightning_cli
            from mmoe_rec.training.sigterm import stopped_by_sigterm

        try:
            run_lightning_cli(argv)
        except (SIGTERMException, Exception) as e:  # SIGTERMException: a SystemExit without a code (exit 0)
            if not stopped_by_sigterm(e):  # ... or a ddp_spawn rank's exit 143
                return _report(e, argv)
            resume = "; a checkpoint it wrote, if any, resumes it with --ckpt_path" if argv[0] == "fit" else ""
            if (os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0") == "0":  # said once, by rank 0
                print(f"error: mmoe-rec {argv[0]} stopped by SIGTERM before it finished (its MLflow run is marked "
                      f"FAILED{resume})", file=sys.stderr)
            return 128 + signal.SIGTERM
        return 0
    asked = bool(argv) and argv[0] in ("-h", "--help")  # every subcommand, not only LightningCLI's four
    print(
        "usage: mmoe-rec {fit,validate,test,predict,synth,features,register,score} ...\n"
        "  fit/validate/test/predict  train and evaluate (LightningCLI; --config configs/<model>_<dataset>.yaml)\n"
        "  synth                      generate built-in synthetic data\n"
        "  features                   fit a FeatureSpec on the train split and write feature Parquet\n"
        "  register                   register a trained model in the MLflow model registry\n"
        "  score                      batch-score raw Parquet or CSV files with a registered model\n"
        "mmoe-rec <subcommand> --help describes each.",
        file=sys.stdout if asked else sys.stderr,
    )
    if argv and not asked:  # `mmoe-rec fitt`: said after the usage, as argparse does, not left to be guessed
        print(f"error: {argv[0]!r} is no mmoe-rec subcommand", file=sys.stderr)
    return 0 if asked else 2


if __name__ == "__main__":
    sys.exit(main())
