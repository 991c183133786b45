"""argparse types the benchmark scripts share: a count below its least value is refused by the parser (a `--rounds
0` ended in a StatisticsError traceback, `--steps 1` of step_budget.py printed negative times)."""
from __future__ import annotations

import argparse
from typing import Callable


def at_least(least: int) -> Callable[[str], int]:
    """An int type for add_argument that refuses values below `least`."""
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value
    parse.__name__ = f"int >= {least}"  # argparse names the type in its message
    return parse
