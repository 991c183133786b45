"""When an epoch's end is an epoch's end: the loop progress a checkpoint holds, rewritten for Lightning's restart."""
from __future__ import annotations

from typing import Any


def epoch_cut_short(trainer: Any) -> bool:
    """Whether the train epoch Lightning is ending stopped before its data ran out: `max_steps` reached mid-epoch
    (Lightning still calls on_train_epoch_end then), or a stop asked mid-epoch. Such an epoch is not closed: its
    running sums stay open, in any checkpoint written now too, so that a fit resumed from it ends the epoch as a
    straight run does (logging it at its cut, then again whole at its real end, gave a run that epoch twice)."""
    return not trainer.is_last_batch


def close_finished_epoch(checkpoint: dict[str, Any], trainer: Any) -> bool:
    """A fit with `max_steps` resumed from a checkpoint written at the end of a whole epoch (in its end hooks:
    Lightning has counted the epoch processed, not yet completed) starts the next epoch, as one without does.
    Lightning closes such an epoch only for a fit without max_steps (`_FitLoop.on_run_start`); with it, the fit
    restarted inside the finished epoch: it ran that epoch's end again, counted it a second time against
    max_epochs (a resume to extend a fit by steps trained nothing and exited 0) and, from a checkpoint of another
    number of ranks, trained the rest of the epoch's batches as the saved rank count had them (rows seen twice).
    Called before Lightning restores its loops; a cut epoch's checkpoint is a mid-epoch one (reopen_cut_epoch) and
    is left to resume mid-epoch. Returns whether it closed one (the module then has the next epoch start as a new
    one, not as Lightning's restart)."""
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop")
    if not fit_loop or trainer.max_steps == -1 or trainer.state.fn != "fit":
        return False
    epochs = fit_loop.get("epoch_progress") or {}
    current = epochs.get("current") or {}
    if not (current and current["ready"] == current["started"] == current["processed"] == current["completed"] + 1):
        return False
    for progress in epochs.values():  # "total" and "current"
        progress["completed"] = progress["processed"]
    batches = fit_loop.get("epoch_loop.batch_progress") or {}
    for key in batches.get("current") or {}:  # the new epoch has no batch done yet
        batches["current"][key] = 0
    if "is_last_batch" in batches:
        batches["is_last_batch"] = False
    return True


def count_epoch_after_last_batch(trainer: Any) -> None:
    """A fit resumed from a checkpoint written on an epoch's last batch (at its end, before the epoch's end) goes on
    with the next epoch: Lightning counts the finished one processed and completed, but, restarting "mid-epoch",
    does not count the next one ready and started (nor calls its on_train_epoch_start). Every later checkpoint of
    that fit then showed a finished epoch, which a fit resumed from it did not restart: one written as a batch failed
    logged every metric a step early (the restart's step Lightning adds, which uncount_unprocessed_batch takes off
    in advance, did not come), one written mid-epoch trained other weights. Counted at the fit's start (on_train_start),
    as Lightning counts an epoch it starts."""
    loop = trainer.fit_loop
    epochs = loop.epoch_progress
    if loop.restarted_mid_epoch and epochs.current.processed == epochs.current.started:
        epochs.increment_ready()
        epochs.increment_started()


def fit_stopped_mid_epoch(trainer: Any) -> bool:
    """Whether the trainer's last fit returned (an evaluation run since, `trainer.test` after `trainer.fit`, or not)
    having stopped in the middle of an epoch: `max_steps` reached mid-epoch, or a stop asked mid-epoch. A
    checkpoint written now (trainer.save_checkpoint) is then that epoch's mid-epoch one, as save_last's at the cut
    end is. The fit loop's counts are the last fit's until the next fit (an evaluation leaves them)."""
    return (trainer.state.status == "finished" and not trainer.training
            and trainer.fit_loop.epoch_progress.current.started > 0 and epoch_cut_short(trainer))


def checkpoint_epoch(trainer: Any) -> int:
    """The epoch a checkpoint written now resumes in: Lightning's current epoch, except after a fit that stopped
    mid-epoch, whose cut epoch Lightning has counted completed by then (current_epoch is the next one): a resume
    went on with the next epoch, leaving the rest of the cut one untrained (51 of a straight run's 63 steps)."""
    epochs = trainer.fit_loop.epoch_progress.current
    # completed == started: the cut epoch's end ran (not so in a fit resumed from its checkpoint that stopped at once)
    counted = fit_stopped_mid_epoch(trainer) and epochs.completed == epochs.started
    return trainer.current_epoch - 1 if counted else trainer.current_epoch


def reopen_cut_epoch(checkpoint: dict[str, Any], trainer: Any) -> None:
    """A checkpoint written at the end of an epoch cut short (`max_steps` reached mid-epoch; save_last writes one),
    or after the fit that it ended (trainer.save_checkpoint), is made the mid-epoch checkpoint it is: Lightning
    counts that epoch as processed there (and completed after the fit), so a fit resumed from it went on with the
    next epoch and skipped the rest of this one (51 of a straight run's 63 steps; the weights and DWA's weights
    came out otherwise). Its epoch's sums are open (epoch_cut_short)."""
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop")
    if not fit_loop or not epoch_cut_short(trainer):
        return
    if trainer.training:
        for progress in fit_loop["epoch_progress"].values():  # "total" and "current"
            if progress["processed"] > progress["completed"]:  # saved inside the epoch's end hooks
                progress["processed"] = progress["completed"]
    # saved after the fit: the cut epoch counted completed
    elif (epoch := checkpoint_epoch(trainer)) < trainer.current_epoch:
        for progress in fit_loop["epoch_progress"].values():
            progress["processed"] = progress["completed"] = progress["completed"] - 1
        checkpoint["epoch"] = epoch


def uncount_unprocessed_batch(checkpoint: dict[str, Any], trainer: Any) -> None:
    """Lightning restarts a fit mid-epoch with its logging step (`_batches_that_stepped`) one higher, unless inside
    an accumulation window: it takes the checkpoint for one written at a batch's end, before that batch counted its
    step. One written as a batch failed before it was processed (OnExceptionCheckpoint: an error in
    on_train_batch_start, the forward or the backward) has counted the steps before it, and the resume replays the
    batch, which counts its own: a resumed fit logged every metric a step late. Saved one lower, the two cancel."""
    loop = trainer.fit_loop.epoch_loop
    progress = loop.batch_progress.total
    if trainer.state.fn != "fit" or trainer.state.status != "interrupted" or progress.processed >= progress.ready:
        return
    if loop._should_accumulate():  # Lightning's test at the restart, on these same counts: it adds nothing then
        return
    state = (checkpoint.get("loops") or {}).get("fit_loop", {}).get("epoch_loop.state_dict")
    if state and "_batches_that_stepped" in state:
        state["_batches_that_stepped"] -= 1
