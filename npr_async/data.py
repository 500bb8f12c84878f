"""Dataset rows `{id, prompt, answer}` (code tasks: `tests` instead of or besides `answer`) in JSONL or Parquet.

Row schema:
- `id`: str, or an int (kept as its string), unique in the file;
- `prompt`: non-empty str;
- `answer`: str, or a number (kept as its string); may be left out when `tests` is given;
- `tests`: non-empty list of str (assert lines / inputs) or of dicts with str values (e.g. {input, output});
- `verifier`: optional str, a verifier name or dotted path overriding the config's default.
Other keys are kept as they are. Null values count as absent (Parquet fills missing columns with nulls).
A bad row raises `DatasetError` naming the file and its line (JSONL) or row number (Parquet, 1-based).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

REQUIRED = ("id", "prompt")


class DatasetError(ValueError):
    pass


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_row(row, where: str) -> dict:
    """The row normalised (ids and numeric answers as str, nulls dropped), or DatasetError naming `where`."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be an object, got {type(row).__name__}")
    row = {k: v for k, v in row.items() if v is not None}
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise DatasetError(f"{where}: missing key {missing[0]!r} (a row needs id, prompt and answer or tests)")
    if "answer" not in row and "tests" not in row:
        raise DatasetError(f"{where}: row {row['id']!r} has neither 'answer' nor 'tests'")
    if isinstance(row["id"], int) and not isinstance(row["id"], bool):
        row["id"] = str(row["id"])
    if not isinstance(row["id"], str) or not row["id"]:
        raise DatasetError(f"{where}: key 'id' must be a non-empty string or an int, got {row['id']!r}")
    if not isinstance(row["prompt"], str) or not row["prompt"]:
        raise DatasetError(f"{where}: key 'prompt' must be a non-empty string, got {row['prompt']!r}")
    if "answer" in row:
        if _is_number(row["answer"]):
            row["answer"] = str(row["answer"])
        if not isinstance(row["answer"], str):
            raise DatasetError(f"{where}: key 'answer' must be a string or a number, got {row['answer']!r}")
    if "tests" in row:
        tests = row["tests"]
        ok = isinstance(tests, list) and tests and all(
            isinstance(t, str) or (isinstance(t, dict) and all(isinstance(v, str) for v in t.values()))
            for t in tests)
        if not ok:
            raise DatasetError(f"{where}: key 'tests' must be a non-empty list of strings or of dicts of "
                               f"strings, got {tests!r:.200}")
    if "verifier" in row and not isinstance(row["verifier"], str):
        raise DatasetError(f"{where}: key 'verifier' must be a string, got {row['verifier']!r}")
    return row


def _check_all(rows_with_where) -> list[dict]:
    out, seen = [], {}
    for row, where in rows_with_where:
        row = check_row(row, where)
        if row["id"] in seen:
            raise DatasetError(f"{where}: duplicate id {row['id']!r} (first at {seen[row['id']]})")
        seen[row["id"]] = where
        out.append(row)
    return out


def iter_jsonl(path: str | os.PathLike):
    """(value, "file:line") for each non-blank line of a JSONL file; bad JSON raises DatasetError there."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield row, f"{path}:{lineno}"


def read_jsonl(path: str | os.PathLike) -> list:
    """Every value of a JSONL file, unchecked (trajectories, metrics, SFT rows)."""
    return [row for row, _ in iter_jsonl(path)]


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises many types for a damaged file
        raise DatasetError(f"{path}: not a readable Parquet file ({e})") from None
    for k, row in enumerate(rows, 1):
        yield row, f"{path}: row {k}"


def load_rows(path: str | os.PathLike) -> list[dict]:
    """All rows of a `.jsonl` or `.parquet` dataset, checked (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    if path.suffix == ".jsonl":
        rows = _check_all(iter_jsonl(path))
    elif path.suffix == ".parquet":
        rows = _check_all(_read_parquet(path))
    else:
        raise DatasetError(f"{path}: unknown dataset format {path.suffix!r}, expected .jsonl or .parquet")
    if not rows:
        raise DatasetError(f"{path}: the dataset has no rows")
    return rows


def write_rows(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Check `rows` and write them to `.jsonl` or `.parquet` (atomically: a temp file, then a rename)."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".parquet"):
        raise DatasetError(f"{path}: unknown dataset format {path.suffix!r}, expected .jsonl or .parquet")
    rows = _check_all((row, f"{path}: row {k}") for k, row in enumerate(rows, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if path.suffix == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            keys = list(dict.fromkeys(k for row in rows for k in row))  # from_pylist looks at row 1 only
            try:
                pq.write_table(pa.table({k: [row.get(k) for row in rows] for k in keys}), tmp)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise DatasetError(f"{path}: rows do not fit one Parquet schema ({e})") from None
            back = [{k: v for k, v in r.items() if v is not None} for r in pq.read_table(tmp).to_pylist()]
            bad = next((k for k, (a, b) in enumerate(zip(rows, back), 1) if a != b), None)
            if bad is not None:  # e.g. dicts in `tests` with different keys come back with nulls
                raise DatasetError(f"{path}: row {bad} does not survive Parquet's schema: "
                                   f"{rows[bad - 1]!r:.200} reads back as {back[bad - 1]!r:.200}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
