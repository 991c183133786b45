"""benchmarks/train_throughput.py: the model FLOP count per training row, recounted by hand (no timing here)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from train_throughput import LARGE, SMALL, MatmulReference, gemms, train_flops_per_row  # noqa: E402


def hand_count(d_in: int, experts: int, hidden: tuple[int, ...], tower: tuple[int, ...], tasks: int) -> int:
    """Multiply-adds per row: experts' layers, one linear gate per task, towers and their 1-unit output, the mixture;
    x 2 FLOPs, x 3 for training (forward X@W, backward dY@W^T, which the embeddings need too, and X^T@dY)."""
    macs, k = 0, d_in
    for h in hidden:
        macs += experts * k * h
        k = h
    macs += tasks * d_in * experts
    t = k
    for h in tower:
        macs += tasks * t * h
        t = h
    macs += tasks * t + tasks * experts * k
    return 6 * macs


def test_large_model_flops_per_row_match_a_hand_count_of_the_census_model():
    # census: 44 sparse features x dim 8 + 6 dense = 358 inputs, 2 tasks (benchmarks/README.md: 6,117,696)
    assert train_flops_per_row(LARGE, 358, 2) == 6_117_696 == hand_count(358, 8, (256, 128), (64,), 2)
    assert train_flops_per_row(SMALL, 44 * 4 + 6, 2) == hand_count(44 * 4 + 6, 8, (16,), (8,), 2)


def test_reference_runs_the_models_gemms_three_times_per_layer():
    shapes = gemms(LARGE, 358, 2, 1024)
    assert shapes == [(8, 1024, 358, 256), (8, 1024, 256, 128), (2, 1024, 358, 8), (2, 1024, 128, 64),
                      (2, 1024, 64, 1)]
    ref = MatmulReference(LARGE, 358, 2)
    mixture = 6 * 2 * 8 * 128  # the gate-weighted sum: counted for the model, no GEMM of the reference
    assert ref.flops == (train_flops_per_row(LARGE, 358, 2) - mixture) * 1024
