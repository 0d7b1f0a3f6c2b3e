"""Datasets for a recipe: read rows, detect the format, tokenize, and report what was dropped and why.

`load_datasets(recipe.data, tokenizer)` returns ALREADY TOKENIZED `datasets.Dataset`s in the form TRL's
SFTTrainer takes as is (trl/trainer/sft_trainer.py `_prepare_dataset`): `input_ids`, plus `assistant_masks`
(chat data, assistant-only loss; TRL always applies it) or `completion_mask` (prompt/completion and alpaca
data; TRL applies it when `completion_only_loss=True`, which training.py sets). Tokenizing here rather than
in TRL is what lets every malformed or too-long row be counted and reported with its file and row number
instead of failing deep inside `Dataset.map` or being truncated silently.

Formats (`data.format`, or `auto` from the columns):
  messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  prompt_completion  {"prompt": str, "completion": str}  (or both lists of messages: conversational)
  alpaca             {"instruction": str, "input": str (optional), "output": str}
  text               {"text": str}
Alpaca rows become a one-turn conversation when the tokenizer has a chat template (so the model learns the
format it will be prompted with), else the classic Alpaca prompt text.
"""

import csv
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetune.config import DataSection
from moetune.errors import MoetuneError
from moetune.rules import DATA_SUFFIXES, is_local_data_source
from moetune.textfiles import NotUtf8Text, decode_utf8


logger = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant", "tool")
MAX_EXAMPLES = 5  # how many malformed / too-long rows the report quotes per split
# The columns that identify each format (what `auto` detection looks for).
FORMAT_COLUMNS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
                  "alpaca": ("instruction", "output"), "text": ("text",)}
ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


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

    def add_malformed(self, where: str, reason: str) -> None:
        self.malformed += 1
        if len(self.malformed_examples) < MAX_EXAMPLES:
            self.malformed_examples.append(f"{where}: {reason}")

    def format_text(self) -> str:
        lines = [
            f"{self.split}: {self.source} ({self.format}): {self.rows_read} rows read, {self.kept} kept "
            f"({self.tokens} tokens), {self.malformed} malformed, {self.too_long} longer than max_length"
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


def load_datasets(data: DataSection, tokenizer) -> LoadedData:
    """Read, tokenize and filter the train (and eval) data of a recipe.

    Raises:
        MoetuneError: a file or Hub dataset cannot be read, the format cannot be detected, the chat template
            cannot mask assistant turns, or a split has no usable rows left.
    """
    report = DataReport()
    train = _load_split("train", data.train, data, tokenizer, report)
    evaluation = _load_split("eval", data.eval, data, tokenizer, report) if data.eval else None
    return LoadedData(train=train, eval=evaluation, report=report)


def _load_split(split: str, source: str, data: DataSection, tokenizer, report: DataReport):
    import datasets

    rep = report.splits[split] = SplitReport(split=split, source=source)
    rows = _read_rows(source, f"data.{split}", rep)
    rep.rows_read = len(rows) + rep.malformed
    rep.format = data.format if data.format != "auto" else _detect_format(rows, f"data.{split}", source)
    for warning in _suspicious_rows(rows, rep.format, f"data.{split}"):
        logger.warning(warning)
        rep.warnings.append(warning)
    tokenize = _Tokenizer(tokenizer, rep.format, data.assistant_only_loss)
    columns: dict[str, list] = {"input_ids": []}
    if tokenize.mask_column:
        columns[tokenize.mask_column] = []
    for where, row in rows:
        try:
            ids, mask = tokenize(row)
        except _Malformed as err:
            rep.add_malformed(where, str(err))
            continue
        if len(ids) > data.max_length:
            rep.too_long += 1
            if len(rep.too_long_examples) < MAX_EXAMPLES:
                rep.too_long_examples.append(f"{where}: {len(ids)} tokens > max_length {data.max_length}")
            continue
        columns["input_ids"].append(ids)
        if tokenize.mask_column:
            columns[tokenize.mask_column].append(mask)
        rep.tokens += len(ids)
    rep.kept = len(columns["input_ids"])
    if rep.kept == 0:
        raise MoetuneError(f"`data.{split}` has no usable rows left after filtering:\n{rep.format_text()}")
    return datasets.Dataset.from_dict(columns)


# ---------------------------------------------------------------------------------------------------- reading


def _read_rows(source: str, key: str, rep: SplitReport) -> list[tuple[str, Any]]:
    """(where, row) pairs; `where` is `file:row` (1-based line or row number) for the report."""
    path = Path(source).expanduser()
    if not is_local_data_source(source):
        return _read_hub(source, key)
    if not path.is_file():
        raise MoetuneError(f"`{key}`: data file {source!r} not found")
    suffix, name = path.suffix.lower(), path.name
    if suffix not in DATA_SUFFIXES:
        raise MoetuneError(f"`{key}`: {source!r} has an unsupported file type; allowed: {', '.join(DATA_SUFFIXES)}")
    if suffix == ".parquet":
        return _read_parquet(path, key)
    text = _read_text(path, key)
    if suffix == ".jsonl":
        return _jsonl_rows(text, name, rep)
    if suffix == ".json":
        return _json_rows(text, name, key, source)
    return _csv_rows(text, name, key, source)


def _jsonl_rows(text: str, name: str, rep: SplitReport) -> list[tuple[str, Any]]:
    rows = []
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{name}:{line_no}", json.loads(line)))
        except json.JSONDecodeError as err:
            rep.add_malformed(f"{name}:{line_no}", f"not valid JSON ({err.msg})")
    return rows


def _json_rows(text: str, name: str, key: str, source: str) -> list[tuple[str, Any]]:
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        raise MoetuneError(f"`{key}`: {source!r} is not valid JSON ({err})") from None
    if isinstance(content, dict):  # {"data": [...]} / {"train": [...]}: the one list inside
        lists = [v for v in content.values() if isinstance(v, list)]
        content = lists[0] if len(lists) == 1 else content
    if not isinstance(content, list):
        raise MoetuneError(f"`{key}`: {source!r} must hold a list of rows (or a mapping with one list)")
    return [(f"{name}:row {i}", row) for i, row in enumerate(content, 1)]


def _csv_rows(text: str, name: str, key: str, source: str) -> list[tuple[str, Any]]:
    # Line 1 is the header; rows are numbered as lines (multi-line fields make this approximate).
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return [(f"{name}:{i}", row) for i, row in enumerate(reader, 2)]
    except csv.Error as err:
        raise MoetuneError(f"`{key}`: {source!r} is not valid CSV at line {reader.line_num}: {err}") from None


def _read_text(path: Path, key: str) -> str:
    try:
        return decode_utf8(path.read_bytes())
    except NotUtf8Text as err:
        raise MoetuneError(f"`{key}`: {path}: {err}") from None


def _read_parquet(path: Path, key: str) -> list[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:  # ArrowInvalid for a cut-off footer, OSError for corrupt metadata
        reason = str(err).split(": ", 1)[-1].splitlines()[0]
        raise MoetuneError(f"`{key}`: {path} is not a readable parquet file (truncated or not parquet: {reason})") from None
    return [(f"{path.name}:row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]


def _read_hub(source: str, key: str) -> list[tuple[str, Any]]:
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
    return [(f"{repo}:{split}:row {i}", row) for i, row in enumerate(ds, 1)]


def _detect_format(rows: list[tuple[str, Any]], key: str, source: str) -> str:
    seen: dict[str, int] = {}
    for _, row in rows[:50]:
        if isinstance(row, dict):
            for col, value in row.items():
                if value not in (None, ""):
                    seen[col] = seen.get(col, 0) + 1
    if "messages" in seen:
        return "messages"
    if "prompt" in seen and "completion" in seen:
        return "prompt_completion"
    if "instruction" in seen and "output" in seen:
        return "alpaca"
    if "text" in seen:
        return "text"
    raise MoetuneError(
        f"`{key}`: cannot tell the format of {source!r} from its columns {sorted(seen) or '(none)'}; expected "
        "messages, prompt+completion, instruction+output (alpaca) or text. Set `data.format` or rename the columns."
    )


def _suspicious_rows(rows: list[tuple[str, Any]], fmt: str, key: str) -> list[str]:
    """Legal rows that are probably mistakes, one warning per kind: count and first file:line."""
    empty_turns, first_empty = 0, None
    foreign: dict[str, list] = {}  # other format -> [count, first where]
    for where, row in rows:
        if not isinstance(row, dict):
            continue  # reported as malformed when tokenized
        for col in ("messages", "prompt", "completion"):
            turns = row.get(col)
            for m in turns if isinstance(turns, list) else []:
                if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str) \
                        and not m["content"].strip():
                    empty_turns += 1
                    first_empty = first_empty or where
        for other, columns in FORMAT_COLUMNS.items():
            if other != fmt and all(row.get(c) not in (None, "") for c in columns):
                foreign.setdefault(other, [0, where])[0] += 1
    warnings = []
    if empty_turns:
        warnings.append(f"`{key}`: {empty_turns} assistant turn{'s' if empty_turns > 1 else ''} with empty content "
                        f"(first: {first_empty}); the model learns to answer them with nothing")
    for other, (count, first) in foreign.items():
        warnings.append(f"`{key}`: {count} row{'s' if count > 1 else ''} of {fmt} data "
                        f"{'have' if count > 1 else 'has'} {other} columns ({', '.join(FORMAT_COLUMNS[other])}) "
                        f"(first: {first}); only the {fmt} columns are read")
    return warnings


# ----------------------------------------------------------------------------------------------- tokenizing


class _Malformed(Exception):
    """A row that does not fit its format; counted and reported, never fatal."""


class _Tokenizer:
    """Turns one row of a given format into (input_ids, loss mask or None)."""

    def __init__(self, tokenizer, fmt: str, answer_only: bool):
        self.tok, self.fmt, self.answer_only = tokenizer, fmt, answer_only
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.template = None
        if fmt == "messages" and answer_only:
            self.template = _training_template(tokenizer)
        self.mask_column = None
        if answer_only:
            self.mask_column = {"messages": "assistant_masks", "prompt_completion": "completion_mask",
                                "alpaca": "completion_mask"}.get(fmt)

    def __call__(self, row: Any) -> tuple[list[int], list[int] | None]:
        if not isinstance(row, dict):
            raise _Malformed(f"expected an object with {self.fmt} fields, got {type(row).__name__}")
        if self.fmt == "messages":
            return self._messages(_messages(row.get("messages"), "messages"))
        if self.fmt == "text":
            text = _text(row, "text")
            ids = self.tok(text)["input_ids"]
            return self._eos(ids), None
        if self.fmt == "alpaca":
            instruction, output = _text(row, "instruction"), _text(row, "output")
            extra = row.get("input") or ""
            if not isinstance(extra, str):
                raise _Malformed(f"`input` must be text, got {type(extra).__name__}")
            question = f"{instruction}\n\n{extra}" if extra else instruction
            if self.chat:
                return self._chat_pair([{"role": "user", "content": question}], [{"role": "assistant", "content": output}])
            label = "### Instruction:\n" + instruction + ("\n\n### Input:\n" + extra if extra else "")
            return self._text_pair(f"{ALPACA_PROMPT}{label}\n\n### Response:\n", output)
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            return self._chat_pair(_messages(prompt, "prompt"), _messages(completion, "completion"))
        return self._text_pair(_text(row, "prompt"), _text(row, "completion"))

    def _eos(self, ids: list[int]) -> list[int]:
        eos = self.tok.eos_token_id
        return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids

    def _messages(self, messages: list[dict]) -> tuple[list[int], list[int] | None]:
        if self.answer_only and not any(m["role"] == "assistant" for m in messages):
            raise _Malformed("no assistant message to train on")
        out = self.tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=self.answer_only,
            chat_template=self.template,
        )
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"]) if self.answer_only else None
        if mask is not None and 1 not in mask:
            raise _Malformed("the chat template left no assistant tokens to train on")
        return ids, mask

    def _chat_pair(self, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int] | None]:
        # As TRL does for conversational prompt/completion: the prompt with the generation prompt is a prefix of
        # the whole conversation, and everything after it is the completion.
        prompt_ids = list(self.tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
        ids = list(self.tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"])
        return self._split(ids, len(prompt_ids))

    def _text_pair(self, prompt: str, completion: str) -> tuple[list[int], list[int] | None]:
        prompt_ids = self.tok(prompt)["input_ids"]
        ids = self._eos(self.tok(prompt + completion)["input_ids"])
        return self._split(ids, len(prompt_ids))

    def _split(self, ids: list[int], prompt_len: int) -> tuple[list[int], list[int] | None]:
        if len(ids) <= prompt_len:
            raise _Malformed("the completion adds no tokens")
        return ids, ([0] * prompt_len + [1] * (len(ids) - prompt_len)) if self.answer_only else None


def _text(row: dict, col: str) -> str:
    value = row.get(col)
    if not isinstance(value, str) or not value.strip():
        raise _Malformed(f"`{col}` must be non-empty text, got {value!r}"[:200])
    return value


def _messages(value: Any, col: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _Malformed(f"`{col}` must be a non-empty list of messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise _Malformed(f"`{col}[{i}]` must be {{role: {'/'.join(ROLES)}, content: text}}, got {m!r}"[:200])
    return value


def _training_template(tokenizer) -> str | None:
    """The chat template to use for assistant-only masks: the tokenizer's own when it marks assistant turns with
    `{% generation %}`, else TRL's training version of a known template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise MoetuneError("the tokenizer has no chat template, so `messages` data cannot be formatted; "
                           "use a chat model's tokenizer or prompt/completion data")
    if re.search(r"{%-?\s*generation\s*-?%}", template):
        return None
    from trl.chat_template_utils import get_training_chat_template

    try:
        return get_training_chat_template(tokenizer)
    except (ValueError, TypeError) as err:
        raise MoetuneError(
            "`data.assistant_only_loss` needs a chat template that marks assistant turns with {% generation %}, "
            f"and this tokenizer's template has none that TRL knows how to patch ({err}). Set "
            "`data.assistant_only_loss: false` to train on every token."
        ) from None
