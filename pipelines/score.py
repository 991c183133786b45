"""Score raw rows with a registered model: a thin entry point of `mmoe-rec score` (see mmoe_rec/registry/scoring.py).

    python pipelines/score.py --model models:/census-mmoe@champion --input raw_rows.parquet --output scores.parquet
"""
import sys

from mmoe_rec.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]], process=True))  # as `mmoe-rec score` runs it: its error report, its set-up
