"""Test helper callbacks (imported by the DDP subprocess via PYTHONPATH): one rank fails in on_fit_end, or aborts
as its process exits after its work is done (as the gloo exit race in mmoe_rec/training/gloo_exit.py does); each
rank's loss-free balancing biases after every step."""
import atexit
import os
import signal

import lightning as L


class FailOnRank(L.Callback):
    def __init__(self, rank: int = 1) -> None:
        self.rank = rank

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"rank {self.rank} fails in on_fit_end")


class AbortAtExit(L.Callback):
    def __init__(self, rank: int = 1) -> None:
        self.rank = rank

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank:
            atexit.register(os.abort)


class BiasAudit(L.Callback):
    """Each rank's loss-free balancing biases at every batch end (after the update, before the next forward, whose
    DDP buffer broadcast would hide a rank that updated from its own loads alone), to OUT_DIR/rank<r>.json."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.biases = out_dir, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.biases.append({name: buf.tolist() for name, buf in pl_module.named_buffers()
                            if name.endswith("balancer.bias")})

    def on_train_end(self, trainer, pl_module) -> None:
        import json
        from pathlib import Path

        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.biases))


class FailMidTraining(L.Callback):
    """Raises on `rank` at its second training batch: the other ranks are then waiting in a collective."""

    def __init__(self, rank: int = 1) -> None:
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and batch_idx == 1:
            raise RuntimeError(f"rank {self.rank} fails mid-training")


class FailBeforeRendezvous(L.Callback):
    """Raises as `rank`'s config is instantiated (LOCAL_RANK is set by the launcher): before the process group
    exists, so rank 0 waits in the rendezvous, not in a collective that could fail."""

    def __init__(self, rank: int = 1) -> None:
        if int(os.environ.get("LOCAL_RANK", "0")) == rank:
            raise RuntimeError(f"rank {rank} fails before the rendezvous")


class SigtermAt(L.Callback):
    """Sends this process a SIGTERM (a scheduler's cancel, `timeout`) at its `batch`-th training or predict batch;
    with `rank`, on that rank only (as `timeout` signals the process it started: rank 0)."""

    def __init__(self, batch: int = 2, rank: int | None = None) -> None:
        self.batch, self.rank = batch, rank

    def _maybe(self, batch_idx: int) -> None:
        if batch_idx == self.batch and (self.rank is None or int(os.environ.get("LOCAL_RANK", "0")) == self.rank):
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe(batch_idx)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._maybe(batch_idx)


class SlowPredictRank(L.Callback):
    """Rank `rank` takes `seconds` a predict batch: the other ranks finish theirs first and wait in the prediction
    writer's collective."""

    def __init__(self, rank: int = 1, seconds: float = 1.0) -> None:
        self.rank, self.seconds = rank, seconds

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_rank == self.rank:
            import time

            time.sleep(self.seconds)


class SigtermInSetup(L.Callback):
    """Sends this process a SIGTERM in its setup hook: before Lightning's handler is in place, the watch's."""

    def setup(self, trainer, pl_module, stage) -> None:
        import signal

        os.kill(os.getpid(), signal.SIGTERM)


class SigtermAndHold(L.Callback):
    """At its `batch`-th predict batch (the earlier ones written): SIGTERM to this process, then `seconds` in the
    hook, as a job held up elsewhere would be (Lightning's handler takes note; the job does not get on)."""

    def __init__(self, batch: int = 2, seconds: float = 60.0) -> None:
        self.batch, self.seconds = batch, seconds

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            import signal
            import time

            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(self.seconds)


class SlowOnException(L.Callback):
    """Rank `rank` takes `seconds` in on_exception (a large on-exception checkpoint): the other ranks have exited."""

    def __init__(self, seconds: float = 12.0, rank: int = 0) -> None:
        self.seconds, self.rank = seconds, rank

    def on_exception(self, trainer, pl_module, exception) -> None:
        if trainer.global_rank == self.rank:
            import time

            time.sleep(self.seconds)


class SigtermRank0BeforeRendezvous(L.Callback):
    """On `rank`, as its config is instantiated: writes its pid to `pid_file`, signals its parent (rank 0, waiting in
    the ranks' rendezvous with its MLflow run made) with SIGTERM, and holds there, as a slow rank would."""

    def __init__(self, pid_file: str, rank: int = 1) -> None:
        if int(os.environ.get("LOCAL_RANK", "0")) == rank:
            import signal
            import time

            with open(pid_file, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(2.0)
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(120.0)


class StallAndSigtermRank0(L.Callback):
    """On `rank`, at its `batch`-th training batch: writes its pid to `pid_file`, waits for rank 0 to reach the
    step's gradient all-reduce, signals rank 0 with SIGTERM and stalls there (alive, as a rank stuck in a slow
    read would), which holds rank 0 in the collective."""

    def __init__(self, pid_file: str, batch: int = 2, rank: int = 1) -> None:
        self.pid_file, self.batch, self.rank = pid_file, batch, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch and trainer.global_rank == self.rank:
            import signal
            import time

            with open(self.pid_file, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(2.0)
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(120.0)


class FailDuringItsCleanup(L.Callback):
    """Fails at the second training batch, and again in on_exception, inside Lightning's exception handling (before
    it marks the run FAILED): as an exception raised asynchronously there does (a DataLoader worker's death, raised
    into the main thread by PyTorch's SIGCHLD handler)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:
            raise RuntimeError("the batch fails")

    def on_exception(self, trainer, pl_module, exception) -> None:
        raise RuntimeError("and so does the cleanup")


class KilledMidTraining(L.Callback):
    """`rank` is SIGKILLed at its second training batch (as the kernel's out-of-memory killer ends a process: no
    traceback, no exception handling); the other ranks are then waiting in a collective."""

    def __init__(self, rank: int = 1) -> None:
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGKILL)


class DieAtPredictionRename(L.Callback):
    """Rank `rank` SIGKILLs itself as it renames its predictions file into place (an OOM kill at that moment)."""

    def __init__(self, rank: int = 1) -> None:
        self.rank = rank

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != self.rank:
            return
        rename = os.replace

        def dying(src, dst, *args, **kwargs):
            if str(dst).endswith(f".rank{self.rank}.parquet"):
                os.kill(os.getpid(), signal.SIGKILL)
            return rename(src, dst, *args, **kwargs)

        os.replace = dying



class SigtermEveryRankAfterBackward(L.Callback):
    """At its `batch`-th training batch, after the backward (the gradients all-reduced), rank 1 signals itself and
    its parent, rank 0 under `ddp` (as `scancel` or a kill of the process group signals every rank, each at its own
    point of the step)."""

    def __init__(self, batch: int = 3) -> None:
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch and trainer.global_rank == 1:
            os.kill(os.getppid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)


class KillsRank0(L.Callback):
    """Rank 1, at its second training batch, writes its pid to `pid_file` and SIGKILLs rank 0, its parent (the
    out-of-memory killer's way: rank 0 runs no cleanup, its MLflow run stays RUNNING unless rank 1 ends it)."""

    def __init__(self, pid_file: str) -> None:
        self.pid_file = pid_file

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 1 and batch_idx == 1:
            with open(self.pid_file, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getppid(), signal.SIGKILL)


class SigtermInValidation(L.Callback):
    """Rank `rank` signals itself with SIGTERM at its `batch`-th validation (or test) batch (not in the sanity
    check); every validation (test) batch then takes `seconds` (a long validation)."""

    def __init__(self, batch: int = 1, rank: int = 0, seconds: float = 0.5) -> None:
        self.batch, self.rank, self.seconds = batch, rank, seconds

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
        if batch_idx == self.batch and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)
        import time

        time.sleep(self.seconds)

    on_test_batch_start = on_validation_batch_start


class KilledWhileSaving(L.Callback):
    """The process is SIGKILLed half way through writing its first checkpoint (the out-of-memory killer, a power
    cut): what it had written is left in the checkpoint folder."""

    def on_train_start(self, trainer, pl_module) -> None:
        import io

        import torch

        def dying_save(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            torch_save(obj, buffer)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch_save = torch.save
        torch.save = dying_save
