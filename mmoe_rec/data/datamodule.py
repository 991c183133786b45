"""LightningDataModule over a feature directory: DIR/spec.json and DIR/{train,valid,test}/*.parquet.

Batches are cut and their columns decoded inside the dataset (in the loader workers when ``num_workers > 0``),
which yields numpy ArrayBatches; the DataLoaders run with ``batch_size=None`` and turn each into a Batch
(zero-copy tensors + KeyedJaggedTensor) in the main process: numpy crosses the worker pipe as bytes, while
torch tensors would each need a shared-memory handshake (~1 ms per tensor; 7x slower at batch 1024).

Lightning moves a Batch to the device by calling ``Batch.to`` (``move_data_to_device`` treats any object
with ``.to`` as one unit), which moves the KeyedJaggedTensor too: no ``transfer_batch_to_device`` override.

Order: valid / test / predict rows are not shuffled; with ``num_workers = 0`` batches follow the files' row
order, with more workers the DataLoader interleaves the workers' contiguous blocks of batches: each batch says its
worker (``Batch.worker``), and the prediction writer puts the rows back in the files' order by it.

Epochs: the train loader asks the attached Trainer for ``current_epoch`` each time it is iterated, so the
shuffle is seeded by ``(seed, epoch)`` under Lightning with no callback. Without a Trainer call ``set_epoch(epoch)``.

Resume: the checkpoint holds the seed, the epoch and how many training batches of that epoch had been trained
(Lightning's batch progress at save time). A run resumed from a mid-epoch checkpoint replays the same epoch's
batch sequence and skips the batches already trained, so it continues with the very next batch: the batch order
of an epoch is a pure function of the epoch, the rank and the "batch plan" saved with it (world size, batch size,
workers, shuffle buffer, chunk rows, drop_last, seed and the train split's files and row groups). A mid-epoch
checkpoint resumes only under the same plan: under another one, skipping its batches would train some rows twice.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch.utils.data import DataLoader

from mmoe_rec.data.batch import Batch
from mmoe_rec.data.collate import ArrayBatch, BatchCollator
from mmoe_rec.data.parquet_stream import FeatureParquetStream, ParquetIndex
from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.training.epochs import checkpoint_epoch, fit_stopped_mid_epoch

SPLITS = ("train", "valid", "test")


def _manifest_rows(data_dir: Path) -> dict[str, int]:
    """Rows per split that the feature build's manifest.json records; empty if there is no readable record."""
    try:
        rows = json.loads((data_dir / "manifest.json").read_text()).get("rows")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(rows, dict):
        return {}
    return {k: v for k, v in rows.items() if isinstance(v, int) and not isinstance(v, bool)}


def _pass_through(item: Any) -> Any:
    # the dataset yields finished batches; module level so workers can pickle it
    return item


class FeatureDataLoader(DataLoader):
    """DataLoader over a FeatureParquetStream whose workers send ArrayBatches (plain numpy, cheap to pickle);
    ``finish`` turns each into a Batch in the consuming process (then pinned if ``pin_batches``).
    ``epoch_fn``, if given, is asked for the epoch each time an epoch's iterator is made, before the workers
    start, so they inherit it."""

    def __init__(
        self,
        dataset: FeatureParquetStream,
        finish: Callable[[ArrayBatch], Batch],
        epoch_fn: Callable[[], int] | None = None,
        skip_fn: Callable[[int], int] | None = None,
        pin_batches: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.finish = finish
        self.epoch_fn = epoch_fn
        self.skip_fn = skip_fn  # epoch -> leading batches to skip (already trained before a mid-epoch resume)
        self.pin_batches = pin_batches

    def __iter__(self) -> Iterator[Batch]:
        skip = 0
        if self.epoch_fn is not None:
            epoch = self.epoch_fn()
            self.dataset.set_epoch(epoch)
            skip = self.skip_fn(epoch) if self.skip_fn is not None else 0
        finish, pin = self.finish, self.pin_batches
        for i, arrays in enumerate(super().__iter__()):
            if i < skip:  # made (the sequence is fixed) but not finished into a Batch
                continue
            batch = finish(arrays)
            yield batch.pin_memory() if pin else batch

    # Lightning asks loaders for state_dict / load_state_dict to decide whether a mid-epoch resume is exact. The
    # position is kept by FeatureDataModule (its checkpoint state is written after the batch counts are final,
    # while a loader is asked after Lightning has already prefetched the next batch); these say where it is.
    def state_dict(self) -> dict[str, Any]:
        return {"position": "kept by FeatureDataModule.state_dict" if self.skip_fn is not None else "none"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class FeatureDataModule(L.LightningDataModule):
    """Streams feature Parquet as Batches.

    Args:
        data_dir: output directory of ``mmoe-rec features`` (spec.json, train/, valid/, test/).
        batch_size: rows per training batch (per rank).
        num_workers: DataLoader worker processes per rank (0 reads in the main process).
        shuffle_buffer: rows held by each worker's training shuffle buffer (on top of the row-group shuffle).
        seed: base seed; epoch e shuffles with a generator seeded by (seed, e).
        tasks: tasks whose labels are loaded (default: all tasks of the spec).
        drop_last: training only; False keeps every row once per epoch (last batches may be smaller),
            True makes only full batches and skips each rank's leftover rows (see parquet_stream, 4.).
        eval_batch_size: batch size of valid / test / predict (default: batch_size).
        predict_split: split the predict loader reads; its batches carry the id columns in ``Batch.ids``.
        pin_memory: pin batches in page-locked memory (for GPU training).
        chunk_rows: rows decoded from Parquet at a time.
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 1024,
        num_workers: int = 0,
        shuffle_buffer: int = 65536,
        seed: int = 0,
        tasks: list[str] | None = None,
        drop_last: bool = False,
        eval_batch_size: int | None = None,
        predict_split: str = "test",
        pin_memory: bool = False,
        chunk_rows: int = 65536,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if predict_split not in SPLITS:
            raise ValueError(f"predict_split must be one of {SPLITS}, got {predict_split!r}")
        # before the trainer and its MLflow run: a batch size of 0 was found when the first loader was made
        # (eval_batch_size 0 silently meant batch_size)
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                   ("shuffle_buffer", shuffle_buffer, 0), ("chunk_rows", chunk_rows, 1)):
            if value < least:
                raise ValueError(f"data {name} must be >= {least}, got {value}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"data eval_batch_size must be >= 1 (or null: batch_size), got {eval_batch_size}")
        if not 0 <= seed < 2 ** 63:  # numpy's generators take no negative seed (found at the first batch)
            raise ValueError(f"data seed must be in [0, 2**63), got {seed}")
        if pin_memory and not torch.cuda.is_available():  # pinning needs an accelerator (it failed at the 1st batch)
            rank_zero_warn("data pin_memory: no CUDA device here, so batches are not pinned")
            pin_memory = False
        self.data_dir = Path(data_dir).expanduser()  # `data_dir: ~/feat` in a YAML, as --checkpoint_dir is read
        self.spec = FeatureSpec.load(self.data_dir / "spec.json")
        if isinstance(tasks, str):  # list("click") would be five one-letter tasks
            raise ValueError(f"data tasks must be a list of task names, e.g. [{tasks}], got the string {tasks!r}")
        self.tasks = list(self.spec.task_names if tasks is None else tasks)
        unknown = [t for t in self.tasks if t not in self.spec.task_names]
        if unknown:  # now, not in a loader worker later
            raise ValueError(f"data tasks {unknown} are not in the feature spec, whose tasks are "
                             f"{self.spec.task_names} ({self.data_dir / 'spec.json'})")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.drop_last = drop_last
        self.eval_batch_size = eval_batch_size or batch_size
        self.predict_split = predict_split
        self.pin_memory = pin_memory
        self.chunk_rows = chunk_rows
        self._epoch = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches of it already trained) from a checkpoint
        self._indexes: dict[tuple[str, bool], ParquetIndex] = {}

    # --- epochs and resume -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """The epoch the next train loader iteration shuffles for, without a Trainer (under one, its current_epoch
        is read instead): a loop of one's own calls it before each epoch, or every epoch has epoch 0's order."""
        self._epoch = epoch

    def current_epoch(self) -> int:
        trainer = self.trainer
        if trainer is not None:
            self._epoch = trainer.current_epoch
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self._epoch, "seed": self.seed, "batches_done": 0}
        trainer = self.trainer
        if trainer is not None and ((trainer.state.fn == "fit" and trainer.state.status in ("running", "interrupted"))
                                    or fit_stopped_mid_epoch(trainer)):
            # batches whose optimizer step is done in the current epoch (a checkpoint written from
            # on_train_batch_end counts the batch just trained, one written by a mid-epoch validation the batches
            # before it; Lightning resumes after them). "interrupted": a checkpoint written on an exception or a
            # SIGTERM (OnExceptionCheckpoint), where Lightning records the position too (the resume had retrained
            # the epoch's first batches and never the last ones). After a fit that max_steps or a stop cut
            # mid-epoch (trainer.save_checkpoint, an evaluation run since or not): the cut epoch's position, as
            # save_last records it at the cut
            state["epoch"] = checkpoint_epoch(trainer)
            state["batches_done"] = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            if math.isfinite(trainer.num_training_batches):  # done == this: written at the epoch's end
                state["epoch_batches"] = int(trainer.num_training_batches)
        state["plan"] = self._batch_plan()
        return state

    def _batch_plan(self) -> dict[str, Any]:
        """What decides which rows a rank's first n batches of an epoch hold (besides the epoch)."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        train = self._index("train")
        return {
            "world_size": int(world_size), "batch_size": self.batch_size, "num_workers": self.num_workers,
            # the buffer's and the chunks' sizes decide when the shuffle buffer permutes
            "shuffle_buffer": self.shuffle_buffer, "chunk_rows": self.chunk_rows, "drop_last": self.drop_last,
            "seed": self.seed, "train_rows": train.num_rows, "train_row_groups": train.fingerprint(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fitting = self.trainer is None or self.trainer.state.fn == "fit"  # evaluation reads no training batches
        if not fitting:  # validate / test of a checkpoint: a later fit of this object starts as its own
            return
        # the checkpoint's seed wins, so a resumed run replays the same shuffles
        self._epoch = int(state_dict["epoch"])
        self.seed = int(state_dict["seed"])
        done = int(state_dict.get("batches_done", 0))
        saved = state_dict.get("plan")
        mid_epoch = 0 < done < state_dict.get("epoch_batches", math.inf)
        if mid_epoch and saved is not None:
            # batches_done counts each rank's batches of the saved plan: under another plan skipping that many
            # would train some rows twice and others not at all in this epoch. Keys a plan saved by an older
            # version lacks cannot be checked.
            now = self._batch_plan()
            changed = ", ".join(f"{k} {v} -> {now.get(k)}" for k, v in saved.items() if now.get(k) != v)
            if "drop_last" not in saved and self.drop_last:  # older code kept another drop_last window
                changed = ", ".join(filter(None, [changed, "drop_last window (saved by an older version)"]))
            if changed:
                raise ValueError(
                    f"this checkpoint was written in the middle of epoch {self._epoch} ({done} batches per rank "
                    f"done); resuming it mid-epoch needs the same batch plan: processes, batch size, loader workers, "
                    f"shuffle buffer, chunk rows, drop_last, seed and train split ({changed}). "
                    f"Resume with the checkpoint's settings and data, or from a checkpoint written at an epoch's end")
        # an epoch's batches all done: nothing to skip in the epoch Lightning resumes in (a SIGTERM noticed at the
        # epoch's end is saved with the next epoch's index and the last one's count: it skipped a whole epoch)
        self._resume_at = (self._epoch, done, state_dict.get("epoch_batches")) if mid_epoch else None

    def _batches_to_skip(self, epoch: int) -> int:
        """Once, for the epoch a mid-epoch checkpoint was written in: how many of its batches were trained. Says so
        when Lightning resumes past that epoch instead: its checkpoint was saved as at an epoch's end (a fit that
        max_steps stopped in the middle of an epoch, with a checkpoint saved at the epoch's end, by a version
        before the module reopened such an epoch in its checkpoints) and the rest of the epoch is not trained."""
        if self._resume_at is None:
            return 0
        saved_epoch, done, total = self._resume_at
        self._resume_at = None
        if saved_epoch == epoch:
            return done
        if epoch > saved_epoch and total is not None and done < total:
            rank_zero_warn(
                f"the checkpoint was written after {done} of the {total} batches of epoch {saved_epoch} (a fit that "
                f"max_steps stopped there, its checkpoint saved as at the epoch's end): Lightning resumes at epoch "
                f"{epoch}, so the other {total - done} batches of epoch {saved_epoch} are not trained (and a "
                f"dynamic-weight-average fit took epoch {saved_epoch}'s loss from the batches before). To continue "
                f"exactly, resume from a checkpoint written during the epoch (ModelCheckpoint every_n_train_steps) "
                f"or by this version, or stop fits at an epoch's end (max_epochs)")
        return 0

    # --- datasets and loaders -----------------------------------------------------------------------------
    def collator(self, with_ids: bool = False) -> BatchCollator:
        return BatchCollator(self.spec, self.tasks, with_ids=with_ids)

    def dataloader(
        self,
        split: str,
        *,
        train: bool = False,
        with_ids: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> FeatureDataLoader:
        """The loader of one split for this rank (rank / world_size default to the DDP / torchrun ones).

        ``train`` shuffles (row groups by (seed, epoch), then the shuffle buffer), follows the Trainer's epoch and
        applies ``drop_last``; otherwise rows come in file order and every row is kept.
        """
        collate = self.collator(with_ids)
        index = self._index(split, with_ids)
        self.check_split_has_rows(split, with_ids)
        ds = FeatureParquetStream(
            index,
            collate.arrays,
            collate.columns,
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            drop_last=self.drop_last and train,
            rank=rank,
            world_size=world_size,
            chunk_rows=self.chunk_rows,
            finite_columns=collate.finite_columns,
            nonnegative_columns=collate.nonnegative_columns,
            id_columns=collate.id_bounds,
            binary_columns=collate.binary_label_columns,
        )
        ds.set_epoch(self._epoch)
        return FeatureDataLoader(
            ds,
            finish=collate.to_batch,
            epoch_fn=self.current_epoch if train else None,
            skip_fn=self._batches_to_skip if train else None,
            batch_size=None,
            collate_fn=_pass_through,
            num_workers=self.num_workers,
            persistent_workers=False,  # workers are re-made each epoch and inherit the new epoch
            pin_batches=self.pin_memory,  # pin the finished Batch (the DataLoader would only see numpy)
            # its own generator: each iterator draws a base seed, which from the global generator would move the
            # model's random stream (routing noise, dropout) at every epoch and validation, and differently in a
            # run resumed from a checkpoint than in one that went straight through
            generator=torch.Generator().manual_seed(self.seed),
        )

    def check_split_has_rows(self, split: str, with_ids: bool = False) -> None:
        """`mmoe-rec features` writes every split, empty where no rows went to it: a loader of an empty one is an
        error saying how to fill it (the CLI asks before the run is made, this again when a loader is made)."""
        if self._index(split, with_ids).num_rows == 0:
            how = f"an input prefixed {split}=" + (f" or --{split}-fraction" if split != "train" else "")
            skip = ", or fit without validation (--trainer.limit_val_batches 0)" if split == "valid" else ""
            raise ValueError(f"split {split!r} in {self.data_dir} has no rows: build the features with rows in it "
                             f"(`mmoe-rec features` with {how}){skip}")

    def _index(self, split: str, with_ids: bool = False) -> ParquetIndex:
        """The split's row groups, its columns' types checked from the footers (cached: read once). A file made
        with another feature spec (its footer says so) is refused, and so is a split whose row count differs from
        the one manifest.json records (a file added to or removed from the folder after the build). Each file's
        identity is kept with it: a loader that opens a file rebuilt since (`mmoe-rec features --overwrite` into
        the folder during a fit) fails naming it, in a loader worker too."""
        key = (split, with_ids)
        if key not in self._indexes:
            collate = self.collator(with_ids)
            index = ParquetIndex.from_dir(self.data_dir / split, collate.columns, collate.column_kinds,
                                          spec_version=self.spec.version)
            self._check_manifest_rows(split, index.num_rows)
            self._indexes[key] = index
        return self._indexes[key]

    def _check_manifest_rows(self, split: str, found: int) -> None:
        """The footers give the row count for free: check it against manifest.json's ``rows`` when the folder has
        one (a folder written by hand or by older tools may have none, or none for this split: nothing to check)."""
        expected = _manifest_rows(self.data_dir).get(split)
        if expected is not None and expected != found:
            raise ValueError(
                f"split {split!r} in {self.data_dir} has {found} rows in its Parquet files, but manifest.json records "
                f"{expected} rows for it: a file was added to or removed from {self.data_dir / split} after the "
                f"feature build (a file of another build would be read with the wrong meaning of its ids). Restore "
                f"the folder or rebuild the features (`mmoe-rec features`)"
            )

    def train_dataloader(self) -> FeatureDataLoader:
        return self.dataloader("train", train=True)

    def val_dataloader(self) -> FeatureDataLoader:
        return self.dataloader("valid")

    def test_dataloader(self) -> FeatureDataLoader:
        return self.dataloader("test")

    def predict_dataloader(self) -> FeatureDataLoader:
        return self.dataloader(self.predict_split, with_ids=True)

    def predict_rows(self) -> int:
        """Rows of the predict split, all ranks together (from the footers): what a prediction writer checks its
        rows against."""
        return self._index(self.predict_split, with_ids=True).num_rows
