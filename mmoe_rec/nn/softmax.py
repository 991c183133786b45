"""Softmax over a short last dimension (a gate's or router's experts) that avoids PyTorch's slow CPU path for it:
`softmax_last_dim(z)`.

PyTorch's CPU softmax over the last dimension vectorizes along that dimension; when it is shorter than one
vector register (16 float32 lanes with AVX-512, 8 with AVX2) every row goes through a scalar path. For the gates
of an MMoE with 8 experts that is 3-4x slower than the same softmax taken over the first dimension of a
transposed copy, where the vectors run across rows (2048 x 8, AVX-512, two threads: 102 against 33 us forward,
150 against 82 us forward + backward; `benchmarks/softmax_small.py`). So for such shapes the logits are copied
to (E, ...), the softmax is taken over their first dimension and the result is a transposed view of it; the
backward runs in that layout too. Elsewhere (CUDA, longer rows, CPUs without AVX2 / AVX-512 kernels, float16 /
bfloat16) it is `torch.softmax` itself. Same values up to rounding (the two kernels sum in different orders;
tested).
"""
from __future__ import annotations

import functools

import torch

# vector lanes per register of PyTorch's CPU kernels, by capability; measured: below these the transposed way
# wins, from them on PyTorch's own (benchmarks/softmax_small.py)
_FLOAT32_LANES = {"AVX512": 16, "AVX2": 8}


@functools.cache
def _cpu_lanes() -> int:
    return _FLOAT32_LANES.get(torch.backends.cpu.get_cpu_capability(), 0)


def transposes(z: torch.Tensor) -> bool:
    """Whether `softmax_last_dim` takes the transposed way for z."""
    if z.device.type != "cpu" or z.dtype not in (torch.float32, torch.float64) or z.dim() < 2 or z.numel() == 0:
        return False
    # float64: half the lanes, a cautious cut (AVX-512, 2048 rows: PyTorch is slow there up to ~32 experts, 101.8
    # against 30.0 us at 8, 118.7 against 99.4 at 32; 141.2 against 833.4 at 64)
    return z.shape[-1] < _cpu_lanes() * 4 // z.element_size()


def softmax_last_dim(z: torch.Tensor) -> torch.Tensor:
    """softmax(z, dim=-1). From the transposed way the result is a view of an (E, ...) tensor (made contiguous
    it would cost a second copy; its consumers, a bmm or elementwise ops, read it as it is)."""
    if transposes(z):
        return transposed_softmax(z)
    return torch.softmax(z, dim=-1)


def transposed_softmax(z: torch.Tensor) -> torch.Tensor:
    """softmax(z, dim=-1) taken over the first dimension of an (E, ...) copy; autograd's ops throughout (its
    backward, softmax's backward over that dimension, has the same vectorization across rows)."""
    return torch.softmax(z.movedim(-1, 0).contiguous(), dim=0).movedim(0, -1)  # (E, ...) -> view (..., E)
