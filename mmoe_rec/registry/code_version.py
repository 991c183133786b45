"""Which mmoe-rec code a model version was registered with, and whether this process runs the same code.

A registered model carries a copy of mmoe-rec's code (`code_paths`): a process that loads it as a pyfunc without
mmoe-rec imported runs that copy, while `mmoe-rec score`, which has imported the installed mmoe-rec first, runs
the installed one. After an upgrade the two can transform or score one model version differently, so each version
is tagged with a fingerprint of the code it was registered with, and the score job says when it runs other code.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import mmoe_rec

CODE_TAG = "mmoe_rec_code"  # model-version tag: code_fingerprint() at registration
# code that cannot change a score: training, the command line, the demo (a change there made every score job of an
# earlier registered model warn that its scores can differ, which taught users to ignore the warning)
NOT_SCORING = ("training", "cli.py", "demo.py")


@functools.cache
def code_fingerprint() -> str:
    """16 hex digits of SHA-256 over the .py files of the running mmoe_rec package that scoring runs (relative path
    and bytes; all but NOT_SCORING), leaving out names that start with "." (an editor's lock or backup file) and
    files that cannot be read."""
    root = Path(mmoe_rec.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or relative.parts[0] in NOT_SCORING:
            continue
        try:
            content = path.read_bytes()
        except OSError:  # a dangling link
            continue
        digest.update(relative.as_posix().encode() + b"\0")
        digest.update(content + b"\0")
    return digest.hexdigest()[:16]


def code_mismatch(model: str, tags: dict[str, str]) -> str | None:
    """A warning when `model` (a model version's `tags`) was registered with code other than this process runs;
    None when the same, or when the version predates the tag."""
    registered = tags.get(CODE_TAG)
    try:
        running = code_fingerprint()
    except OSError:  # a check that only warns never stops a job
        return None
    if registered is None or registered == running:
        return None
    return (f"warning: {model} was registered with mmoe-rec code {registered}, and this job runs code "
            f"{running}: its scores can differ from the model's pyfunc, which runs the code saved with "
            "the model. Register the model again with this code, or score where the code it was registered with "
            "is installed.")
