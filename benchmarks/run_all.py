"""`make bench`: every benchmark, one after another, each printing its own ratios measured side by side.

Run on idle cores: these scripts print the CPU share other processes took where it matters, and a busy
machine distorts absolute times (the ratios less so).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    ["feature_build.py"],  # 5M synthetic rows: fit + transform rows/s, peak RSS
    ["data_loading.py"],  # streaming DataModule rows/s
    ["cpu_gemm.py"],  # float32 GEMMs: PyTorch's mm (MKL) vs oneDNN, per shape and layout
    ["moe_layer.py"],  # sparse dispatch vs dense vs per-expert loop vs plain matmul
    ["expert_stack.py"],  # dense experts: autograd path vs nn.relu_experts, and the training step with each
    ["softmax_small.py"],  # gate softmax over few experts: torch.softmax vs the transposed way
    ["train_throughput.py"],  # training rows/s vs DeepCTR-Torch and torch-rechub on census features
    ["step_budget.py"],  # the large model's step against the plain-matmul reference, piece by piece (after the
    # line above: it reads the census features that train_throughput.py builds)
    ["precision.py"],  # the large model's step in float32 against bf16-mixed (the same census features)
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="SCRIPT", choices=[b[0] for b in BENCHMARKS],
                   help="run these scripts alone, in the order above (each has its own --help)")
    only = p.parse_args(argv).only  # --help prints this and exits; it used to start the whole suite
    failed = []
    for script, *args in BENCHMARKS:
        if only and script not in only:
            continue
        print(f"\n===== benchmarks/{script} {' '.join(args)}", flush=True)
        rc = subprocess.run([sys.executable, str(HERE / script), *args]).returncode
        if rc:
            failed.append(script)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
