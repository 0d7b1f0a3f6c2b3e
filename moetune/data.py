"""Datasets for a recipe: read rows, detect the format, tokenize, and report what was dropped and why.

`load_datasets(recipe.data, tokenizer)` returns ALREADY TOKENIZED `datasets.Dataset`s in the form TRL's
SFTTrainer takes as is (trl/trainer/sft_trainer.py `_prepare_dataset`): `input_ids`, plus `assistant_masks`
(chat data, assistant-only loss; TRL always applies it) or `completion_mask` (prompt/completion and alpaca
data; TRL applies it when `completion_only_loss=True`, which training.py sets). Tokenizing here rather than
in TRL is what lets every malformed or too-long row be counted and reported with its file and row number
instead of failing deep inside `Dataset.map` or being truncated silently. The formats are in `moetune.data_rows`,
the readers in `moetune.data_sources`.

How (and why this way):
  * The rows become a `datasets.Dataset` and are tokenized with `Dataset.map(num_proc=...)`; the map returns
    `input_ids`, the mask and a `_problem` string per row ("" = kept), and the report (malformed with file:line,
    too long, warnings) is built from those columns. Under several processes (DDP) the main process tokenizes
    first and the other ranks read its cache.
  * The result is cached on disk (`<HF datasets cache>/moetune/<key>`, `moetune.data_cache`), keyed by the file (path, size, mtime)
    or the Hub dataset's fingerprint, the tokenizer (name + a hash of its vocab, special tokens and chat
    template), the format, max_length, assistant_only_loss and the row limit. A rerun, a `--resume` and every
    other rank load it memory-mapped instead of tokenizing again.
  * `max_rows` (the runner passes what `train.max_steps` consumes) tokenizes only the first rows, with a margin,
    and more if too many of them are dropped.
  * Local .jsonl/.json/.csv files are read by our own reader into one column of JSON text per row, parsed inside
    the map, not by `load_dataset("json"/"csv")`: one line that is not JSON fails that loader's whole file, and its
    error names neither the line nor the row ("JSON parse error ... in row 1" of a block), while the report must
    count the bad line and keep the rest (docs/upstream.md#datasets-json-loader). A .json/.csv file is parsed
    whole by Python anyway (one document, DictReader) to give the same per-row report. Parquet files and Hub
    datasets already have a schema and are used as they are.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from moetune.config import DataSection
from moetune.data_cache import (
    CACHE_VERSION,
    cache_key,
    library_versions,
    main_process_first,
    progress_bars,
    read_cache,
    tokenizer_fingerprint,
    write_cache,
)
from moetune.data_rows import Malformed, RowTokenizer, detect_format, suspicious
from moetune.data_sources import _local_identity, _read_hub, _read_rows, _row_of
from moetune.errors import MoetuneError


logger = logging.getLogger(__name__)
MAX_EXAMPLES = 5  # how many malformed / too-long rows the report quotes per split
PARALLEL_FROM = 20_000  # rows; below this, worker processes cost more than they save


@dataclass
class SplitReport:
    split: str
    source: str
    format: str = ""
    rows_read: int = 0
    kept: int = 0
    tokens: int = 0
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    too_long: int = 0
    too_long_examples: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    trained_tokens: int = 0  # tokens the loss is computed on (all of them without a mask)
    lengths: dict[str, int] = field(default_factory=dict)  # p50 / p90 / p99 / max tokens of the kept rows
    rows_available: int | None = None  # rows in the source when only the first `rows_read` were needed
    cached: bool = False  # loaded from the tokenized cache

    def add_malformed(self, where: str, reason: str) -> None:
        self.malformed += 1
        if len(self.malformed_examples) < MAX_EXAMPLES:
            self.malformed_examples.append(f"{where}: {reason}")

    def format_text(self) -> str:
        lines = [
            f"{self.split}: {self.source} ({self.format}): {self.rows_read} rows read, {self.kept} kept "
            f"({self.tokens} tokens), {self.malformed} malformed, {self.too_long} longer than max_length"
            + (f"; a fixed sample of {self.rows_read} of {self.rows_available} rows (enough for train.max_steps)"
               if self.rows_available is not None else "")
        ]
        lines += [f"  malformed  {e}" for e in self.malformed_examples]
        lines += [f"  too long   {e}" for e in self.too_long_examples]
        return "\n".join(lines)


@dataclass
class DataReport:
    splits: dict[str, SplitReport] = field(default_factory=dict)

    def format_text(self) -> str:
        return "\n".join(r.format_text() for r in self.splits.values())

    def to_dict(self) -> dict[str, Any]:
        return {name: vars(r) for name, r in self.splits.items()}


@dataclass
class LoadedData:
    train: Any  # datasets.Dataset
    eval: Any | None
    report: DataReport


def load_datasets(data: DataSection, tokenizer, *, max_rows: int | None = None, num_proc: int | None = None,
                  cache: bool = True) -> LoadedData:
    """Read, tokenize and filter the train (and eval) data of a recipe.

    Args:
        data: the recipe's `data` section.
        tokenizer: the model's tokenizer.
        max_rows: train rows the run will consume (`max_steps` x global batch); only about that many are
            tokenized. None: all. Eval data is always read whole.
        num_proc: tokenizer processes (default: the CPU count, up to 8, for chat data of 20k rows or more).
        cache: read and write the tokenized cache (see the module docstring).

    Raises:
        MoetuneError: a file or Hub dataset cannot be read, the format cannot be detected, the chat template
            cannot mask assistant turns, or a split has no usable rows left.
    """
    report = DataReport()
    splits = [("train", data.train, max_rows)] + ([("eval", data.eval, None)] if data.eval else [])
    loaded = {}
    for split, source, limit in splits:
        loaded[split] = _load_split(split, source, data, tokenizer, report, limit=limit, num_proc=num_proc, cache=cache)
    return LoadedData(train=loaded["train"], eval=loaded.get("eval"), report=report)


def _load_split(split: str, source: str, data: DataSection, tokenizer, report: DataReport, *, limit: int | None,
                num_proc: int | None, cache: bool):
    key = f"data.{split}"
    identity = _local_identity(source, key)  # checks the file before anything else
    with main_process_first():
        rows = None
        if identity is None:  # a Hub dataset: its identity is its fingerprint, known once loaded
            rows = _read_hub(source, key)
            identity = {"hub": source, "fingerprint": rows._fingerprint}
        base = {"v": CACHE_VERSION, "libs": library_versions(), "source": identity, "tokenizer": tokenizer_fingerprint(tokenizer),
                "format": data.format, "max_length": data.max_length, "assistant_only_loss": data.assistant_only_loss}
        # Only the exact key: a limited run trains on its own sample of rows (see `_tokenize`), so a full
        # tokenization must not stand in for it, or the data a recipe trains on would depend on the cache's state.
        keys = [cache_key(base, limit)]
        if cache:
            for key_hash in keys:
                hit = read_cache(key_hash)
                if hit is not None:
                    dataset, stored = hit
                    rep = report.splits[split] = SplitReport(**{**stored, "split": split, "source": source, "cached": True})
                    for warning in rep.warnings:
                        logger.warning(warning)
                    return dataset
        rep = report.splits[split] = SplitReport(split=split, source=source)
        if rows is None:
            rows = _read_rows(source, key, rep)
        dataset = _tokenize(rows, data, tokenizer, rep, key, source, limit=limit, num_proc=num_proc)
        if cache:
            write_cache(keys[-1], dataset, {**vars(rep), "cached": False})
        return dataset


# ----------------------------------------------------------------------------------------------- tokenizing


class _MapRows:
    """The `Dataset.map` function (batched): token ids, mask, `_problem` ("" = kept) and the warning counts."""

    def __init__(self, tokenizer: RowTokenizer, max_length: int):
        self.tokenize, self.max_length = tokenizer, max_length

    def __call__(self, batch: dict) -> dict:
        mask_col = self.tokenize.mask_column
        out: dict[str, list] = {"input_ids": [], "_problem": [], "_where": batch["_where"], "_empty": [],
                                "_foreign": [], "_trained": []}
        if mask_col:
            out[mask_col] = []
        rows: list[Any] = []
        for i in range(len(batch["_where"])):
            try:
                rows.append(_row_of(batch, i))
            except json.JSONDecodeError as err:
                rows.append(Malformed(f"not valid JSON ({err.msg})"))
        if self.tokenize.fmt == "text":
            parsed = [r for r in rows if not isinstance(r, Malformed)]
            encoded = iter(self.tokenize.encode_texts(parsed))
            results = [r if isinstance(r, Malformed) else next(encoded) for r in rows]
        else:
            results = [r if isinstance(r, Malformed) else self._one(r) for r in rows]
        for row, result in zip(rows, results):
            ids, mask, problem, empty, foreign = [], None, "", 0, ""
            if isinstance(result, Malformed):
                problem = f"m {result}"
            else:
                ids, mask = result
                if len(ids) > self.max_length:
                    problem = f"l {len(ids)} tokens > max_length {self.max_length}"
            if not isinstance(row, Malformed):
                empty, foreign = suspicious(row, self.tokenize.fmt)
            if problem:
                ids, mask = [], []
            out["input_ids"].append(ids)
            out["_problem"].append(problem)
            out["_empty"].append(empty)
            out["_foreign"].append(foreign)
            out["_trained"].append(len(ids) if mask is None else sum(mask))
            if mask_col:
                out[mask_col].append(mask if mask is not None else [])
        return out

    def _one(self, row: Any):
        try:
            return self.tokenize(row)
        except Malformed as err:
            return err


LIMIT_SAMPLE_SEED = 0  # which rows a `max_rows` run tokenizes: fixed, so reruns and --resume see the same rows


def _tokenize(rows, data: DataSection, tokenizer, rep: SplitReport, key: str, source: str, *, limit: int | None,
              num_proc: int | None):
    import datasets

    rep.format = data.format if data.format != "auto" else detect_format(_first_rows(rows), key, source)
    tokenize = RowTokenizer(tokenizer, rep.format, data.assistant_only_loss)
    features = {"input_ids": datasets.Sequence(datasets.Value("int32")), "_problem": datasets.Value("string"),
                "_where": datasets.Value("string"), "_empty": datasets.Value("int32"),
                "_foreign": datasets.Value("string"), "_trained": datasets.Value("int64")}
    if tokenize.mask_column:
        features[tokenize.mask_column] = datasets.Sequence(datasets.Value("int8"))
    total, start, parts, kept = len(rows), 0, [], 0
    # With a limit: the rows it needs plus 5% for dropped ones; if more were dropped, as many again as are missing.
    step = total if limit is None else min(total, limit + limit // 20 + 64)
    if step < total:
        # A seeded sample from the whole file, not its first rows: without the limit the trainer would draw its
        # `max_steps` batches from every row, and a file sorted by task must not train on its first tasks only.
        rows = rows.shuffle(seed=LIMIT_SAMPLE_SEED)
    while start < total:
        chunk = rows.select(range(start, min(total, start + step))) if step < total or start else rows
        # `text` rows are batch-encoded by the tokenizer's own threads; the chat formats render a template per row
        # in Python, which only more processes speed up.
        parallel = len(chunk) >= PARALLEL_FROM and rep.format != "text"
        procs = num_proc if num_proc is not None else (min(os.cpu_count() or 1, 8) if parallel else 1)
        if procs > 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers; else a warning per worker
        with progress_bars(len(chunk) >= PARALLEL_FROM):  # a bar only where tokenizing takes a while
            part = chunk.map(_MapRows(tokenize, data.max_length), batched=True, batch_size=256, remove_columns=chunk.column_names,
                             features=datasets.Features(features), num_proc=procs if procs > 1 else None,
                             desc=f"Tokenizing {rep.split} data")
        parts.append(part)
        kept += _column(part, "_problem").count("")
        start += len(chunk)
        if limit is None or kept >= limit:
            break
        step = max(2 * (limit - kept), 64)
    if start < total:
        rep.rows_available = total
    tokenized = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    rep.rows_read = len(tokenized)
    return _finish(tokenized, rep, key)


def _first_rows(rows) -> list:
    head = rows.select(range(min(len(rows), 50)))[:]
    parsed = []
    for i in range(len(head["_where"])):
        try:
            parsed.append(_row_of(head, i))
        except json.JSONDecodeError:
            continue
    return parsed


def _finish(tokenized, rep: SplitReport, key: str):
    """Build the report from the per-row columns, keep the good rows, drop the helper columns."""
    problems, wheres = _column(tokenized, "_problem"), _column(tokenized, "_where")
    keep = []
    for i, problem in enumerate(problems):
        if not problem:
            keep.append(i)
        elif problem[0] == "m":
            rep.add_malformed(wheres[i], problem[2:])
        else:
            rep.too_long += 1
            if len(rep.too_long_examples) < MAX_EXAMPLES:
                rep.too_long_examples.append(f"{wheres[i]}: {problem[2:]}")
    rep.warnings = _warnings(_column(tokenized, "_empty"), _column(tokenized, "_foreign"), wheres, rep.format, key)
    for warning in rep.warnings:
        logger.warning(warning)
    rep.kept = len(keep)
    if rep.kept == 0:
        raise MoetuneError(f"`{key}` has no usable rows left after filtering:\n{rep.format_text()}")
    kept = tokenized.select(keep) if len(keep) < len(tokenized) else tokenized
    lengths = sorted(_lengths(kept))
    rep.tokens = sum(lengths)
    rep.trained_tokens = int(sum(_column(kept, "_trained")))
    rep.lengths = {name: lengths[min(len(lengths) - 1, int(q * len(lengths)))] for name, q in
                   (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))} | {"max": lengths[-1]}
    return kept.remove_columns(["_problem", "_where", "_empty", "_foreign", "_trained"])


def _column(dataset, name: str) -> list:
    """One column as a Python list (`dataset[name]` decodes it row by row: 100x slower)."""
    return dataset.with_format("arrow")[name].to_pylist()


def _lengths(dataset) -> list[int]:
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


def _warnings(empty: list[int], foreign: list[str], wheres: list[str], fmt: str, key: str) -> list[str]:
    """Legal rows that are probably mistakes, one warning per kind: count and first file:line."""
    from moetune.data_rows import FORMAT_COLUMNS

    empty_turns = sum(empty)
    first_empty = next((w for w, n in zip(wheres, empty) if n), None)
    others: dict[str, list] = {}  # other format -> [count, first where]
    for where, names in zip(wheres, foreign):
        for other in names.split(",") if names else ():
            others.setdefault(other, [0, where])[0] += 1
    warnings = []
    if empty_turns:
        warnings.append(f"`{key}`: {empty_turns} assistant turn{'s' if empty_turns > 1 else ''} with empty content "
                        f"(first: {first_empty}); the model learns to answer them with nothing")
    for other, (count, first) in others.items():
        warnings.append(f"`{key}`: {count} row{'s' if count > 1 else ''} of {fmt} data "
                        f"{'have' if count > 1 else 'has'} {other} columns ({', '.join(FORMAT_COLUMNS[other])}) "
                        f"(first: {first}); only the {fmt} columns are read")
    return warnings
