"""A checkpoint path checked before it is read: `check_checkpoint_file(path)`.

torch.load reports a file that is no checkpoint in ways that name neither the file nor the cause: a Parquet file
as "Weights only load failed ... Re-running torch.load with weights_only set to False will likely succeed" (advice
that would unpickle an arbitrary file), a truncated one as "[Errno 22] Invalid argument", an empty one as a bare
EOFError, a text file as "KeyError: 101". A checkpoint written by `torch.save` (as Lightning writes them) is a zip
archive with a `<name>/data.pkl` member; reading its central directory is cheap (the end of the file), so every
path is checked this way before the checkpoint is loaded.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path


# --ckpt_path values Lightning resolves itself ("last": the latest of the ModelCheckpoint callbacks, ...)
LIGHTNING_CKPT_NAMES = ("best", "last", "hpc", "registry")
# entries of every checkpoint Lightning writes, found as strings in its pickled structure
LIGHTNING_CHECKPOINT_KEYS = (b"state_dict", b"pytorch-lightning_version")


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Raises FileNotFoundError / ValueError naming `path` unless it is a readable torch.save zip archive (a name
    Lightning resolves itself, or a remote URL, is left to Lightning)."""
    text = str(path)
    if text in LIGHTNING_CKPT_NAMES or text.startswith("registry:") or "://" in text:
        return
    p = Path(path).expanduser()  # Lightning and torch read `~/...` (through fsspec), unexpanded by a shell in YAML
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p}: no such file")
    if p.is_dir():
        raise ValueError(f"checkpoint {p}: a folder, not a checkpoint file (e.g. checkpoints/<run>/best.ckpt)")
    size = p.stat().st_size
    if size == 0:
        raise ValueError(f"checkpoint {p}: an empty file")
    try:
        with zipfile.ZipFile(p) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
            # the object's structure (dict keys as strings; tensors are stored apart): small, read whole
            structure = archive.read(pickles[0]) if pickles else b""
    except zipfile.BadZipFile:
        pickles = None
    if not pickles:
        raise ValueError(f"checkpoint {p} ({size:,} bytes): not a checkpoint written by `mmoe-rec fit` "
                         f"(a PyTorch checkpoint is a zip archive{' with a data.pkl' if pickles == [] else ''}; "
                         "this file is truncated or another kind of file)")
    if not all(key in structure for key in LIGHTNING_CHECKPOINT_KEYS):
        raise ValueError(f"checkpoint {p}: a file written by torch.save, but not a Lightning checkpoint (it has no "
                         "'state_dict' and 'pytorch-lightning_version' entries: e.g. a bare state_dict or a "
                         "registered package's weights.pt); give a checkpoint written by `mmoe-rec fit`, "
                         "e.g. checkpoints/<run>/best.ckpt")
