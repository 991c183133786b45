"""Census-Income (KDD): column names, the MMoE paper's two tasks, and a streaming reader of the vendored .xz CSVs.

The raw files (data/census_income/{train,test}.csv.xz, see PROVENANCE.md there) have no header, 42 fields
separated by ", " and ``?`` for missing values. Tasks (Ma et al., KDD 2018): ``income`` = income_50k is
``50000+.``; ``never_married`` = marital_stat is ``Never married``. Both source columns and the survey weight
``instance_weight`` are not features (configs/features/census.yaml). Usual protocol: train on train.csv, split
test.csv 1:1 into valid / test with a fixed seed (``--input valid+test=...``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmoe_rec.features.schema import ReaderSpec
from mmoe_rec.features.sources import iter_batches

COLUMNS = (
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode", "education",
    "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_stat", "major_industry_code", "major_occupation_code",
    "race", "hispanic_origin", "sex", "member_of_a_labor_union", "reason_for_unemployment",
    "full_or_part_time_employment_stat", "capital_gains", "capital_losses", "dividends_from_stocks",
    "tax_filer_stat", "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household", "instance_weight",
    "migration_code_change_in_msa", "migration_code_change_in_reg", "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago", "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self",
    "citizenship", "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits", "weeks_worked_in_year", "year", "income_50k",
)
INCOME_COLUMN, INCOME_POSITIVE, INCOME_NEGATIVE = "income_50k", "50000+.", "- 50000."
MARITAL_COLUMN, NEVER_MARRIED = "marital_stat", "Never married"
MARITAL_VALUES = ("Never married", "Married-civilian spouse present", "Divorced", "Widowed", "Separated",
                  "Married-spouse absent", "Married-A F spouse present")
WEIGHT_COLUMN = "instance_weight"
NOT_FEATURES = (INCOME_COLUMN, MARITAL_COLUMN, WEIGHT_COLUMN)
TASKS = ("income", "never_married")

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "census_income"
READER = ReaderSpec(header=False, column_names=COLUMNS, delimiter=",", strip_whitespace=True, null_values=())


def raw_path(split: str, data_dir: str | Path = DATA_DIR) -> Path:
    """data/census_income/{train,test}.csv.xz of the vendored copy."""
    if split not in ("train", "test"):
        raise ValueError(f"census raw files are 'train' and 'test', not {split!r}")
    return Path(data_dir) / f"{split}.csv.xz"


def iter_raw(path: str | Path, columns: tuple[str, ...] = COLUMNS, batch_rows: int = 65_536
             ) -> Iterator[pa.RecordBatch]:
    """Named, whitespace-stripped string columns of a census CSV (.csv or .csv.xz), streamed."""
    for _, batch in iter_batches(str(path), list(columns), READER, batch_rows):
        yield batch


def labels(batch: pa.RecordBatch | pa.Table) -> dict[str, np.ndarray]:
    """The two tasks' 0/1 labels from raw (stripped) columns; raises on an unknown income or marital-status value
    (an unknown marital status would read as "not never married")."""
    income, marital = batch.column(INCOME_COLUMN), batch.column(MARITAL_COLUMN)
    for name, column, known in (("income", income, [INCOME_POSITIVE, INCOME_NEGATIVE]),
                                ("marital status", marital, list(MARITAL_VALUES))):
        ok = pc.is_in(column, value_set=pa.array(known)).to_numpy(zero_copy_only=False)
        if not ok.all():
            raise ValueError(f"unknown {name} value {column[int(np.argmax(~ok))].as_py()!r}")
    return {
        "income": pc.equal(income, INCOME_POSITIVE).to_numpy(zero_copy_only=False).astype(np.float32),
        "never_married": pc.equal(marital, NEVER_MARRIED)
        .to_numpy(zero_copy_only=False).astype(np.float32),
    }
