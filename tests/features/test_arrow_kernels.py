"""pyarrow 22's if_else on sliced string arrays (wrong bytes, no error) and the transform of sliced batches: what
the score job's `to_batches(batch_size=...)` hands over after each file's first batch."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from mmoe_rec.features.arrow_kernels import if_else, unsliced
from mmoe_rec.features.fit import fit
from mmoe_rec.features.schema import parse_schema
from mmoe_rec.features.transform import transform_table


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string(), pa.binary(), pa.large_binary()])
@pytest.mark.parametrize("chunked", [False, True])
def test_if_else_with_a_null_scalar_and_a_sliced_array_keeps_the_values(kind, chunked):
    full = pa.array(["AAAA", "BBBB", "x", "", "hello", "world"], pa.string()).cast(kind)
    sliced = full.slice(2)  # offset 2: pyarrow 22 gave "he\x00\x00\x00" for "hello"
    empty = pc.equal(sliced.cast(pa.string()), "")
    null = pa.scalar(None, kind)
    if chunked:
        sliced, empty = pa.chunked_array([sliced]), pa.chunked_array([empty])
    binary = kind in (pa.binary(), pa.large_binary())
    expected = [v.encode() if binary and v is not None else v for v in ["x", None, "hello", "world"]]
    assert if_else(empty, null, sliced).to_pylist() == expected
    assert if_else(pc.invert(empty), sliced, null).to_pylist() == expected
    assert unsliced(sliced).to_pylist() == sliced.to_pylist()


SCHEMA = {
    "reader": {"null_values": ["", "NULL"], "strip_whitespace": True},
    "categorical": [{"name": "device"}, {"name": "city", "transform": "hash", "buckets": 64},
                    {"name": "genres", "multi_valued": True, "delimiter": "|"}],
    "numeric": [{"name": "price"}],
    "tasks": [{"name": "click"}],
}


@pytest.mark.parametrize("strip", [True, False])
def test_a_sliced_batch_transforms_as_the_same_rows_copied(strip):
    """Every batch after a file's first is a slice; its empty / "NULL" strings went through if_else, which read
    other rows' bytes (wrong ids, or "Invalid UTF8 sequence" once trimmed)."""
    n = 600
    devices = ["", "NULL", None, " ios ", "android", "web-browser-long-name"]
    table = pa.table({
        "device": [devices[i % 6] for i in range(n)],
        "city": [["", "paris", "NULL", "lyon-sur-mer"][i % 4] for i in range(n)],
        "genres": [["", "a|b", "NULL", "comedy | drama|x"][i % 4] for i in range(n)],
        "price": [["", "1.5", "NULL", " 20 "][i % 4] for i in range(n)],
        "click": [i % 2 for i in range(n)],
    })
    schema = dict(SCHEMA, reader={"null_values": ["", "NULL"], "strip_whitespace": strip})
    spec = fit(parse_schema(schema), [table])
    whole = transform_table(spec, table)
    for start in (1, 7, 250, 599):
        part = transform_table(spec, table.slice(start, 97))
        assert part.equals(whole.slice(start, 97)), start


def test_the_package_calls_if_else_only_through_the_guard():
    """A new `pc.if_else` on a string column would bring the sliced-array bug back."""
    from pathlib import Path

    import mmoe_rec

    root = Path(mmoe_rec.__file__).parent
    direct = [str(p.relative_to(root)) for p in root.rglob("*.py")
              if p.name != "arrow_kernels.py" and "pc.if_else(" in p.read_text()]
    assert direct == []
