"""Build feature Parquet from raw rows: a thin entry point of `mmoe-rec features` (see mmoe_rec/features/build.py).

    python pipelines/build_features.py --schema configs/features/census.yaml \
        --input train=data/census_income/train.csv.xz --input valid+test=data/census_income/test.csv.xz \
        --output data/census_features --seed 0
"""
import sys

from mmoe_rec.cli import main

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]], process=True))  # as `mmoe-rec features` runs it: its error report, its set-up
