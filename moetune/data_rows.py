"""One row of a data format -> token ids and loss mask, or the reason it is malformed. Used by `moetune.data`.

Formats (`data.format`, or `auto` from the columns):
  messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  sharegpt           {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": ...}]}  (mapped to messages)
  prompt_completion  {"prompt": str, "completion": str}  (or both lists of messages: conversational)
  alpaca             {"instruction": str, "input": str (optional), "output": str}
  text               {"text": str}
Alpaca rows become a one-turn conversation when the tokenizer has a chat template (so the model learns the
format it will be prompted with), else the classic Alpaca prompt text.
"""

import re
from typing import Any

from moetune.errors import MoetuneError


ROLES = ("system", "user", "assistant", "tool")
# The columns that identify each format (what `auto` detection looks for), in detection order.
FORMAT_COLUMNS = {"messages": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion"),
                  "alpaca": ("instruction", "output"), "text": ("text",)}
# ShareGPT speaker names (`from`) seen in the wild -> chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "tool": "tool", "observation": "tool", "function_response": "tool"}
ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


def detect_format(rows: list[Any], key: str, source: str) -> str:
    """The format of `source` from the non-empty columns of its first rows."""
    seen: dict[str, int] = {}
    for row in rows[:50]:
        if isinstance(row, dict):
            for col, value in row.items():
                if value not in (None, ""):
                    seen[col] = seen.get(col, 0) + 1
    for fmt, columns in FORMAT_COLUMNS.items():
        if all(c in seen for c in columns):
            return fmt
    raise MoetuneError(
        f"`{key}`: cannot tell the format of {source!r} from its columns {sorted(seen) or '(none)'}; expected "
        "messages, conversations (sharegpt), prompt+completion, instruction+output (alpaca) or text. Set "
        "`data.format` or rename the columns."
    )


def suspicious(row: Any, fmt: str) -> tuple[int, str]:
    """Legal but probably mistaken: (empty assistant turns, comma-joined other formats whose columns are filled)."""
    if not isinstance(row, dict):
        return 0, ""  # reported as malformed when tokenized
    empty = 0
    for col in ("messages", "prompt", "completion", "conversations"):
        turns = row.get(col)
        for m in turns if isinstance(turns, list) else []:
            if not isinstance(m, dict):
                continue
            role, content = (m.get("role"), m.get("content")) if col != "conversations" else \
                (SHAREGPT_ROLES.get(m.get("from")), m.get("value"))
            if role == "assistant" and isinstance(content, str) and not content.strip():
                empty += 1
    foreign = [other for other, columns in FORMAT_COLUMNS.items()
               if other != fmt and all(row.get(c) not in (None, "") for c in columns)]
    return empty, ",".join(foreign)


class Malformed(Exception):
    """A row that does not fit its format; counted and reported, never fatal."""


MASK_COLUMNS = {"messages": "assistant_masks", "sharegpt": "assistant_masks", "prompt_completion": "completion_mask",
                "alpaca": "completion_mask"}


class RowTokenizer:
    """Turns one row of a given format into (input_ids, loss mask or None)."""

    def __init__(self, tokenizer, fmt: str, answer_only: bool):
        self.tok, self.fmt, self.answer_only = tokenizer, fmt, answer_only
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.template = None
        if fmt in ("messages", "sharegpt") and answer_only:
            self.template = training_template(tokenizer)
        elif fmt in ("messages", "sharegpt") and not self.chat:
            training_template(tokenizer)  # raises the "no chat template" error up front, not once per row
        self.mask_column = MASK_COLUMNS.get(fmt) if answer_only else None

    def __call__(self, row: Any) -> tuple[list[int], list[int] | None]:
        if not isinstance(row, dict):
            raise Malformed(f"expected an object with {self.fmt} fields, got {type(row).__name__}")
        if self.fmt == "messages":
            return self._messages(_messages(row.get("messages"), "messages"))
        if self.fmt == "sharegpt":
            return self._messages(_sharegpt(row.get("conversations")))
        if self.fmt == "text":
            text = _text(row, "text")
            ids = self.tok(text)["input_ids"]
            return self._eos(ids), None
        if self.fmt == "alpaca":
            instruction, output = _text(row, "instruction"), _text(row, "output")
            extra = row.get("input") or ""
            if not isinstance(extra, str):
                raise Malformed(f"`input` must be text, got {type(extra).__name__}")
            question = f"{instruction}\n\n{extra}" if extra else instruction
            if self.chat:
                return self._chat_pair([{"role": "user", "content": question}], [{"role": "assistant", "content": output}])
            label = "### Instruction:\n" + instruction + ("\n\n### Input:\n" + extra if extra else "")
            return self._text_pair(f"{ALPACA_PROMPT}{label}\n\n### Response:\n", output)
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            return self._chat_pair(_messages(prompt, "prompt"), _messages(completion, "completion"))
        return self._text_pair(_text(row, "prompt"), _text(row, "completion"))

    def encode_texts(self, rows: list[Any]) -> list["tuple[list[int], None] | Malformed"]:
        """`text` rows in one batched tokenizer call (its Python overhead per call outweighs the tokenizing)."""
        texts: list[str | None] = []
        results: list = []
        for row in rows:
            try:
                if not isinstance(row, dict):
                    raise Malformed(f"expected an object with {self.fmt} fields, got {type(row).__name__}")
                texts.append(_text(row, "text"))
                results.append(None)
            except Malformed as err:
                texts.append(None)
                results.append(err)
        good = [t for t in texts if t is not None]
        encoded = iter(self.tok(good)["input_ids"] if good else [])
        return [(self._eos(list(next(encoded))), None) if r is None else r for r in results]

    def _eos(self, ids: list[int]) -> list[int]:
        eos = self.tok.eos_token_id
        return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids

    def _messages(self, messages: list[dict]) -> tuple[list[int], list[int] | None]:
        if self.answer_only and not any(m["role"] == "assistant" for m in messages):
            raise Malformed("no assistant message to train on")
        out = self.tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=self.answer_only,
            chat_template=self.template,
        )
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"]) if self.answer_only else None
        if mask is not None and 1 not in mask:
            raise Malformed("the chat template left no assistant tokens to train on")
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
            raise Malformed("the completion adds no tokens")
        return ids, ([0] * prompt_len + [1] * (len(ids) - prompt_len)) if self.answer_only else None


def _text(row: dict, col: str) -> str:
    value = row.get(col)
    if not isinstance(value, str) or not value.strip():
        raise Malformed(f"`{col}` must be non-empty text, got {value!r}"[:200])
    return value


def _messages(value: Any, col: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise Malformed(f"`{col}` must be a non-empty list of messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise Malformed(f"`{col}[{i}]` must be {{role: {'/'.join(ROLES)}, content: text}}, got {m!r}"[:200])
    return value


def _sharegpt(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise Malformed(f"`conversations` must be a non-empty list of turns, got {type(value).__name__}")
    messages = []
    for i, turn in enumerate(value):
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise Malformed(f"`conversations[{i}]` must be {{from: human/gpt/system/tool, value: text}}, got {turn!r}"[:200])
        messages.append({"role": role, "content": turn["value"]})
    return messages


def training_template(tokenizer) -> str | None:
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
