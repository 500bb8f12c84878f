"""data.py: round trips read back by json/pyarrow themselves, and every bad row named by file and line."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from npr_async.data import DatasetError, load_rows, write_rows

ROWS = [{"id": "a", "prompt": "1+1?", "answer": "2"},
        {"id": "b", "prompt": "add", "tests": ["assert add(1, 2) == 3"], "verifier": "code"},
        {"id": "c", "prompt": "echo", "answer": "x", "tests": ["x"], "level": 3}]


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_round_trip(tmp_path, ext):
    path = write_rows(tmp_path / f"sub/d.{ext}", ROWS)
    rows = load_rows(path)
    assert rows == ROWS
    # read back by the format's own library, not ours
    raw = ([json.loads(x) for x in path.read_text().splitlines()] if ext == "jsonl"
           else pq.read_table(path).to_pylist())
    assert [r["id"] for r in raw] == ["a", "b", "c"] and raw[1]["tests"] == ["assert add(1, 2) == 3"]
    assert not list(path.parent.glob(".*tmp*"))  # no temp file left behind


rows_strategy = st.lists(st.fixed_dictionaries({"prompt": st.text(min_size=1), "answer": st.text()}),
                         min_size=1, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows_strategy, st.sampled_from(["jsonl", "parquet"]))
def test_round_trip_any_text(tmp_path, rows, ext):
    rows = [{"id": f"r{k}", **r} for k, r in enumerate(rows)]
    assert load_rows(write_rows(tmp_path / f"h.{ext}", rows)) == rows


def test_dict_tests_and_parquet_schema_limits(tmp_path):
    io_rows = [{"id": "a", "prompt": "p", "tests": [{"input": "1", "output": "2"}]}]
    assert load_rows(write_rows(tmp_path / "io.jsonl", io_rows)) == io_rows
    assert load_rows(write_rows(tmp_path / "io.parquet", io_rows)) == io_rows
    with pytest.raises(DatasetError, match="do not fit one Parquet schema"):  # list<str> vs list<struct>
        write_rows(tmp_path / "mix.parquet", ROWS[:2] + [{**io_rows[0], "id": "z"}])
    ragged = [{"id": "a", "prompt": "p", "tests": [{"input": "1"}, {"input": "2", "output": "3"}]}]
    with pytest.raises(DatasetError, match="row 1 does not survive Parquet"):
        write_rows(tmp_path / "ragged.parquet", ragged)
    assert not (tmp_path / "ragged.parquet").exists()


def test_numbers_become_strings(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text('{"id": 7, "prompt": "p", "answer": 42}\n\n{"id": 8, "prompt": "q", "answer": 0.5}\n')
    assert load_rows(p) == [{"id": "7", "prompt": "p", "answer": "42"}, {"id": "8", "prompt": "q", "answer": "0.5"}]


GOOD = '{"id": "ok", "prompt": "p", "answer": "1"}'


@pytest.mark.parametrize("bad_line,message", [
    ('{"id": "x", "prompt": "p", "answer": ', "not valid JSON"),
    ('["id", "prompt"]', "a row must be an object, got list"),
    ('{"prompt": "p", "answer": "1"}', "missing key 'id'"),
    ('{"id": "x", "answer": "1"}', "missing key 'prompt'"),
    ('{"id": "x", "prompt": "p"}', "has neither 'answer' nor 'tests'"),
    ('{"id": true, "prompt": "p", "answer": "1"}', "key 'id' must be a non-empty string or an int, got True"),
    ('{"id": "x", "prompt": 5, "answer": "1"}', "key 'prompt' must be a non-empty string, got 5"),
    ('{"id": "x", "prompt": "", "answer": "1"}', "key 'prompt' must be a non-empty string, got ''"),
    ('{"id": "x", "prompt": "p", "answer": ["1"]}', "key 'answer' must be a string or a number, got ['1']"),
    ('{"id": "x", "prompt": "p", "tests": []}', "key 'tests' must be a non-empty list"),
    ('{"id": "x", "prompt": "p", "tests": [1]}', "key 'tests' must be a non-empty list"),
    ('{"id": "x", "prompt": "p", "answer": "1", "verifier": 3}', "key 'verifier' must be a string, got 3"),
    ('{"id": "ok", "prompt": "again", "answer": "2"}', "duplicate id 'ok' (first at "),
])
def test_bad_jsonl_row_names_file_and_line(tmp_path, bad_line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(GOOD + "\n\n" + bad_line + "\n" + GOOD.replace("ok", "later") + "\n")
    with pytest.raises(DatasetError) as e:
        load_rows(p)
    assert str(e.value).startswith(f"{p}:3: ") and message in str(e.value)


def test_bad_parquet_row_names_row_number(tmp_path):
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "p", "answer": "1"},
                                         {"id": "b", "prompt": "p", "answer": None}]), p)
    with pytest.raises(DatasetError, match=r"bad\.parquet: row 2: row 'b' has neither 'answer' nor 'tests'"):
        load_rows(p)
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": 1, "answer": "1"}]), p)
    with pytest.raises(DatasetError, match=r"row 1: key 'prompt' must be a non-empty string, got 1"):
        load_rows(p)
    p.write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        load_rows(p)


def test_bad_files_and_writes(tmp_path):
    with pytest.raises(DatasetError, match="dataset file not found: .*nope.jsonl"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("id,prompt\n")
    with pytest.raises(DatasetError, match=r"unknown dataset format '\.csv'"):
        load_rows(tmp_path / "d.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_rows(tmp_path / "empty.jsonl")
    with pytest.raises(DatasetError, match=r"out.jsonl: row 2: duplicate id 'a'"):
        write_rows(tmp_path / "out.jsonl", [ROWS[0], ROWS[0]])
    with pytest.raises(DatasetError, match="unknown dataset format"):
        write_rows(tmp_path / "out.txt", ROWS)
    assert not (tmp_path / "out.jsonl").exists()
