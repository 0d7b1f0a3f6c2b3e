"""Reading a data source (a local .jsonl/.json/.csv/.parquet file or a Hub dataset) into rows for `moetune.data`
to tokenize, each row with where it came from (`file:line`) so the data report can point at it."""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetune.errors import MoetuneError
from moetune.rules import DATA_SUFFIXES, is_local_data_source
from moetune.textfiles import NotUtf8Text, decode_utf8


if TYPE_CHECKING:
    from moetune.data import SplitReport

_JSON = "_json"  # the column holding one row as JSON text (our own readers)


def _local_identity(source: str, key: str) -> dict | None:
    """What identifies a local file's content for the cache (None for a Hub id); raises if it cannot be read."""
    if not is_local_data_source(source):
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        raise MoetuneError(f"`{key}`: data file {source!r} not found")
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise MoetuneError(f"`{key}`: {source!r} has an unsupported file type; allowed: {', '.join(DATA_SUFFIXES)}")
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_rows(source: str, key: str, rep: "SplitReport"):
    """The rows of a source as a `datasets.Dataset` with a `_where` column (`file:line`, `file:row N`) for the
    report; rows of our own readers are JSON text in `_json` (see the module docstring of `moetune.data`)."""
    import datasets

    if not is_local_data_source(source):
        return _read_hub(source, key)
    _local_identity(source, key)
    path = Path(source).expanduser()
    suffix, name = path.suffix.lower(), path.name
    if suffix == ".parquet":
        table = _read_parquet(path, key)
        return datasets.Dataset(table).add_column("_where", [f"{name}:row {i}" for i in range(1, table.num_rows + 1)])
    text = _read_text(path, key)
    if suffix == ".jsonl":
        lines = text.split("\n")
        numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
        return datasets.Dataset.from_dict({_JSON: [line for _, line in numbered],
                                           "_where": [f"{name}:{i}" for i, _ in numbered]})
    rows = _json_rows(text, key, source) if suffix == ".json" else _csv_rows(text, key, source)
    return datasets.Dataset.from_dict({_JSON: [json.dumps(r) for r in rows],
                                       "_where": [f"{name}:{'row ' if suffix == '.json' else ''}{i}"
                                                  for i in range(1 if suffix == ".json" else 2, len(rows) + (1 if suffix == ".json" else 2))]})


def _json_rows(text: str, key: str, source: str) -> list:
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        raise MoetuneError(f"`{key}`: {source!r} is not valid JSON ({err})") from None
    if isinstance(content, dict):  # {"data": [...]} / {"train": [...]}: the one list inside
        lists = [v for v in content.values() if isinstance(v, list)]
        content = lists[0] if len(lists) == 1 else content
    if not isinstance(content, list):
        raise MoetuneError(f"`{key}`: {source!r} must hold a list of rows (or a mapping with one list)")
    return content


def _csv_rows(text: str, key: str, source: str) -> list[dict]:
    import csv
    import io

    # Line 1 is the header; rows are numbered as lines (multi-line fields make this approximate).
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return list(reader)
    except csv.Error as err:
        raise MoetuneError(f"`{key}`: {source!r} is not valid CSV at line {reader.line_num}: {err}") from None


def _read_text(path: Path, key: str) -> str:
    try:
        return decode_utf8(path.read_bytes())
    except NotUtf8Text as err:
        raise MoetuneError(f"`{key}`: {path}: {err}") from None


def _read_parquet(path: Path, key: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, memory_map=True)
    except (pa.ArrowException, OSError) as err:  # ArrowInvalid for a cut-off footer, OSError for corrupt metadata
        reason = str(err).split(": ", 1)[-1].splitlines()[0]
        raise MoetuneError(f"`{key}`: {path} is not a readable parquet file (truncated or not parquet: {reason})") from None


def _read_hub(source: str, key: str):
    import datasets

    repo, _, split = source.partition(":")
    split = split or "train"
    try:
        ds = datasets.load_dataset(repo, split=split)
    except Exception as err:  # noqa: BLE001 -- network, auth, missing split: all the same to the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoetuneError(
            f"`{key}`: could not load Hub dataset {repo!r} (split {split!r}): {reason}. Without network access, "
            "point it at a local .jsonl/.json/.csv/.parquet file instead."
        ) from None
    return ds.add_column("_where", [f"{repo}:{split}:row {i}" for i in range(1, len(ds) + 1)])


def _row_of(batch: dict, i: int) -> Any:
    if _JSON in batch:
        return json.loads(batch[_JSON][i])
    return {col: values[i] for col, values in batch.items() if col != "_where"}

