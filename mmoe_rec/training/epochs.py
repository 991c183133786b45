"""When an epoch's end is an epoch's end."""
from __future__ import annotations

from typing import Any


def epoch_cut_short(trainer: Any) -> bool:
    """Whether the train epoch Lightning is ending stopped before its data ran out: `max_steps` reached mid-epoch
    (Lightning still calls on_train_epoch_end then), or a stop asked mid-epoch. Such an epoch is not closed: its
    running sums stay open, in any checkpoint written now too, so that a fit resumed from it ends the epoch as a
    straight run does (logging it at its cut, then again whole at its real end, gave a run that epoch twice)."""
    return not trainer.is_last_batch
