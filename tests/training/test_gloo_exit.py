"""settle_gloo_workers: the pause a rank takes before exiting when it ran gloo collectives, none otherwise (the race
it avoids, a gloo worker releasing a Python object during interpreter finalization, cannot be forced in a test:
see mmoe_rec/training/gloo_exit.py for the core dumps that showed it)."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from mmoe_rec.training.gloo_exit import settle_gloo_workers


def test_no_pause_without_a_process_group():
    assert not dist.is_initialized()
    start = time.perf_counter()
    assert settle_gloo_workers(5.0) is False
    assert time.perf_counter() - start < 1.0


def test_a_pause_with_a_gloo_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        t = torch.ones(3)
        dist.all_reduce(t)
        start = time.perf_counter()
        assert settle_gloo_workers(0.05) is True
        assert time.perf_counter() - start >= 0.05
        start = time.perf_counter()
        assert settle_gloo_workers(0.4) is True  # the pause asked for, longer than the default one
        assert time.perf_counter() - start >= 0.4
    finally:
        dist.destroy_process_group()
