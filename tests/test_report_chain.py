"""mmoe-rec's one-line error names the exception that was raised, not one handled before it (review)."""
from __future__ import annotations

import errno

from mmoe_rec.cli import _report


def test_report_names_the_raised_error_not_an_earlier_handled_one(capsys, monkeypatch):
    # shutil.move onto a read-only folder on another file system: os.rename fails with EXDEV (handled: it falls back
    # to a copy), then the copy's open fails with EROFS, raised "during handling of" the EXDEV error
    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    try:
        try:
            raise OSError(errno.EXDEV, "Invalid cross-device link", "/tmp/tmpabc", None, "/ro/ck/best.ckpt")
        except OSError:
            raise OSError(errno.EROFS, "Read-only file system", "/ro/ck/best.ckpt")
    except OSError as e:
        assert _report(e, ["fit"]) == 1
    err = capsys.readouterr().err
    assert "Read-only file system" in err, err
    assert "cross-device" not in err, err
