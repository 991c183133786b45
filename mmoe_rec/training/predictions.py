"""ParquetPredictionWriter: what `mmoe-rec predict` writes. Each predict batch's id columns and `score_<task>`
(a probability for binary tasks, the prediction for regression) are appended to one Parquet file, in the split's
row order, every row once. The file is written under a temporary name beside the target and renamed when the epoch
is complete, so a failed run leaves no partial output. With several processes each writes its own rows to
`<stem>.rank<k><suffix>` (rank 0 included; rank k's rows follow rank k-1's in the split). A rank that got no batch
(possible with a custom data module's stream) writes an empty file in the columns and types the lowest rank with
rows wrote, so that the rank files read as one table.

Row order with loader workers: each worker makes one contiguous block of its rank's rows and the DataLoader
interleaves the workers' batches, so batches are written to one temporary part per worker (`Batch.worker`), and
the parts are joined in worker order at the epoch's end (without ids, as in census features, the order is what
ties a score to its row).

Before any file is renamed, the ranks sum their row counts (a collective: a rank that died fails it, and with it
the run, instead of rank 0 finishing alone with half the rows), and the total must be the predict split's rows
when the data module says how many (`predict_rows()`). After the rename, rank 0 removes the files an earlier run
wrote under the same path with another number of processes (`<stem><suffix>` beside rank files, or rank files
past this run's), so that the folder holds one run's predictions, each row once; it warns naming them.
"""
from __future__ import annotations

import glob
import os
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn

from mmoe_rec.features.spec import check_ids_are_not_outputs, score_column
from mmoe_rec.output_dir import missing_parents, remove_empty_folders, resolved_output, spelt_as_folder, temp_path


class ParquetPredictionWriter(BasePredictionWriter):
    def __init__(self, output: str = "predictions.parquet") -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output).expanduser()  # from a YAML file or a quoted argument no shell expanded it
        self._given = output  # as written: Path drops a trailing "/"
        self._parts: dict[int, tuple[Path, pq.ParquetWriter]] = {}  # loader worker -> its part and writer
        self._target: Path | None = None
        self._partial: Path | None = None
        self._made: list[Path] = []  # folders made for the output: removed again if the run fails
        self.rows = 0
        self.batches = 0

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if stage == "predict" and trainer.limit_predict_batches == 0:  # Lightning skips the epoch: no hook of ours
            raise ValueError(f"limit_predict_batches={trainer.limit_predict_batches} predicts no batch: nothing "
                             f"would be written to {self.output}")

    def check_output(self, world_size: int = 1) -> None:
        """Before the run: each file this writer will replace can be a file (a folder there is an error)."""
        if spelt_as_folder(self._given):
            raise IsADirectoryError(f"predictions output {self._given} is a folder; give a file path, such as "
                                    f"{self.output / 'predictions.parquet'}")
        for rank in range(world_size):
            target = resolved_output(self._path(rank, world_size))
            if target.is_dir():
                raise IsADirectoryError(f"predictions output {target} is a directory; give a file path")

    def target(self, trainer: "L.Trainer") -> Path:
        return self._path(trainer.global_rank, trainer.world_size)

    def _path(self, rank: int, world_size: int) -> Path:
        """The file rank `rank` of a run of `world_size` processes writes."""
        if world_size == 1:
            return self.output
        return self.output.with_name(f"{self.output.stem}.rank{rank}{self.output.suffix}")

    def on_predict_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self.check_output(trainer.world_size)
        spec = getattr(pl_module, "spec", None)
        check_ids_are_not_outputs(spec.id_columns if spec is not None else [], pl_module.tasks)
        self._target = resolved_output(self.target(trainer))  # a symlink: its target is replaced, the link stays
        self._made = missing_parents(self._target)
        self._target.parent.mkdir(parents=True, exist_ok=True)
        self._partial = temp_path(self._target, "partial")
        # made at once: a failing job (another rank's, another run's) removes a folder it made only while empty
        self._partial.touch()
        self._parts, self.rows, self.batches = {}, 0, 0

    def _part(self, worker: int) -> Path:
        return self._partial.with_name(f"{self._partial.name}.worker{worker}")

    def write_on_batch_end(self, trainer, pl_module, prediction: dict[str, Any], batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        columns = {name: values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
                   for name, values in (prediction.get("ids") or {}).items()}  # ids keep their Arrow type
        columns.update({k: pa.array(v.float().numpy()) for k, v in prediction.items() if k.startswith("score_")})
        table = pa.table(columns)
        worker = getattr(batch, "worker", 0)
        if worker not in self._parts:
            path = self._part(worker)
            self._parts[worker] = (path, pq.ParquetWriter(path, table.schema))
        self._parts[worker][1].write_table(table)
        self.rows += table.num_rows
        self.batches += 1

    def _close_parts(self) -> list[Path]:
        """Closes every part's writer; the parts in worker order (the rank's row order)."""
        for _, writer in self._parts.values():
            writer.close()
        paths = [path for _, (path, _) in sorted(self._parts.items())]
        self._parts = {}
        return paths

    def _join(self, parts: list[Path]) -> None:
        """The parts, one after the other, as the partial file (a rename for one part); the parts removed."""
        if len(parts) == 1:
            os.replace(parts[0], self._partial)
            return
        try:
            with pq.ParquetWriter(self._partial, pq.read_schema(parts[0])) as out:
                for part in parts:
                    for rows in pq.ParquetFile(part).iter_batches():
                        out.write_batch(rows)
        finally:
            for part in parts:
                part.unlink(missing_ok=True)

    def on_predict_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        parts = self._close_parts()
        schema = _first_schema(pq.read_schema(parts[0]) if parts else None)
        if not parts:  # no batch on this rank: an empty file in the columns another rank wrote (ids included)
            if schema is None:  # no rank had a batch: the score columns (ids have no type to give them)
                schema = pa.schema([(score_column(t), pa.float32()) for t in pl_module.tasks])
            pq.write_table(schema.empty_table(), self._partial)
        else:
            self._join(parts)
        # every rank's rows and batches, summed: with a rank gone this collective fails, and no file is renamed
        count = torch.tensor([float(self.rows), float(self.batches)], dtype=torch.float64, device=pl_module.device)
        total, batches = (int(x) for x in trainer.strategy.reduce(count, reduce_op="sum").tolist())
        predict_rows = getattr(trainer.datamodule, "predict_rows", None)
        expected = predict_rows() if callable(predict_rows) else None
        limited = _limited_batches(trainer)
        if limited is None:
            if expected is not None and total != expected:
                raise RuntimeError(f"predictions: {total} rows written over {trainer.world_size} process(es), but "
                                   f"the predict split has {expected}; nothing was written to {self.output}")
        else:  # the epoch was cut short on purpose: each rank wrote the batches it was let run, no fewer
            setting, ran = limited
            if batches != ran * trainer.world_size:
                raise RuntimeError(f"predictions: {batches} batches written over {trainer.world_size} process(es), "
                                   f"but {setting} lets each run {ran}; nothing was written to {self.output}")
            rank_zero_warn(f"predictions: {setting} limits the run to {total} of the predict split's "
                           f"{expected if expected is not None else 'unknown number of'} rows: the predictions "
                           "hold those only")
        replaced = self._target.exists()
        if trainer.world_size > 1:  # every earlier rank file goes before any new one comes: a rank that dies in
            trainer.strategy.barrier()  # between leaves files missing, never two runs' files side by side
            if trainer.is_global_zero:
                for rank in range(trainer.world_size):
                    self._path(rank, trainer.world_size).unlink(missing_ok=True)
            trainer.strategy.barrier()
        os.replace(self._partial, self._target)
        if replaced:  # the folder holds one run's predictions: said, not silent (`score` asks for --overwrite)
            warnings.warn(f"predictions: replaced the file an earlier run wrote at {self._target}", UserWarning,
                          stacklevel=2)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self._remove_earlier_runs(trainer.world_size)

    def _remove_earlier_runs(self, world_size: int) -> None:
        """Files of an earlier run under this path with another number of processes: read with this run's, a
        folder of them would hold rows twice."""
        mine = {self._path(rank, world_size) for rank in range(world_size)}
        rank_file = re.compile(rf"{re.escape(self.output.stem)}\.rank\d+{re.escape(self.output.suffix)}")
        stale = sorted(p for p in self.output.parent.iterdir()
                       if p not in mine and (p == self.output or rank_file.fullmatch(p.name)))
        for p in stale:
            p.unlink()
        if stale:
            rank_zero_warn(f"removed the predictions an earlier run wrote under {self.output} with another number "
                           f"of processes: {', '.join(p.name for p in stale)}")

    def remove_temporary_files(self) -> None:
        """This process's parts and partial file unlinked as they are, writers open, found by their names (a part
        being opened meanwhile is not yet in `_parts`): for a process about to end by os._exit, past on_exception
        (sigterm's watch ending a stopped job)."""
        if self._partial is None:
            return
        for path in (self._partial, *self._partial.parent.glob(f"{glob.escape(self._partial.name)}.worker*")):
            path.unlink(missing_ok=True)
        remove_empty_folders(self._made)

    def on_exception(self, trainer: "L.Trainer", pl_module: "L.LightningModule", exception: BaseException) -> None:
        self._close_parts()
        self.remove_temporary_files()  # under DDP another rank's files keep a shared folder


def _first_schema(mine: pa.Schema | None) -> pa.Schema | None:
    """The schema of the lowest rank that wrote rows (this one's without other processes), so that a rank without
    a batch writes the columns and types the others wrote: the rank files then read as one table. Every rank
    calls it (a collective)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return mine
    gathered: list[bytes | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, None if mine is None else mine.serialize().to_pybytes())
    first = next((b for b in gathered if b is not None), None)
    return None if first is None else pa.ipc.read_schema(pa.py_buffer(first))


def _limited_batches(trainer: "L.Trainer") -> tuple[str, int] | None:
    """(the Trainer setting, the batches it lets each rank run) where it ran fewer batches than the loader has (the
    rows then fall short of the split's), else None: a limit at or above the loader's length cuts nothing."""
    loaders = trainer.predict_dataloaders
    try:
        full = sum(len(dl) for dl in (loaders if isinstance(loaders, (list, tuple)) else [loaders]))
    except TypeError:  # a loader without a length: Lightning cannot cut it by a fraction either
        return None
    ran = sum(trainer.num_predict_batches)
    if ran >= full:
        return None
    setting = (f"fast_dev_run={trainer.fast_dev_run}" if trainer.fast_dev_run
               else f"limit_predict_batches={trainer.limit_predict_batches}")
    return setting, int(ran)
