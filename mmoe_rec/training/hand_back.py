"""ddp_spawn / ddp_fork hand rank 0's weights back to the launching process in a file, `.temp.ckpt`, in a folder of
its own under $TMPDIR (Lightning's `_MultiProcessingLauncher`). Lightning removes the file after loading it, not the
folder: every such fit left an empty tmpXXXXXXXX folder behind. `install()` has the folder removed too."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any


def install() -> None:
    """Wrap the launcher's hand-back so that the folder goes with its file (idempotent)."""
    try:
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    except ImportError:  # another Lightning layout
        return
    original = _MultiProcessingLauncher._recover_results_in_main_process
    if getattr(original, "_removes_folder", False):
        return

    @functools.wraps(original)
    def recover_results_in_main_process(self: Any, worker_output: Any, trainer: Any) -> None:
        original(self, worker_output, trainer)
        path = getattr(worker_output, "weights_path", None)
        if path is not None and not os.path.exists(path):  # Lightning removed the file it loaded
            with contextlib.suppress(OSError):  # not empty (something else put a file there): left alone
                os.rmdir(os.path.dirname(path))

    recover_results_in_main_process._removes_folder = True  # type: ignore[attr-defined]
    _MultiProcessingLauncher._recover_results_in_main_process = recover_results_in_main_process
