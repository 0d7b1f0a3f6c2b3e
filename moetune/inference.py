"""Use what you trained: load a run dir exactly as training left it, generate in batches, chat with streamed tokens.

    moetune generate runs/my-run --file prompts.jsonl --out answers.jsonl
    moetune chat runs/my-run

`load_for_inference` loads a LoRA run as base + adapter (the base in 4-bit when the run's recipe.yaml has a
`quantization` section, with the same fp32 router), and a full or merged model directory, or a Hub id, as it is.
"""

import json
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetune.errors import MoetuneError
from moetune.textfiles import NotUtf8Text, decode_utf8


Prompt = str | list[dict[str, str]]  # plain text, or chat messages


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. Greedy unless `temperature` > 0."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise MoetuneError(f"--max-new-tokens must be positive (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise MoetuneError(f"--temperature must be >= 0, 0 meaning greedy (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise MoetuneError(f"--top-p must be in (0, 1] (got {self.top_p})")

    def generate_kwargs(self, tokenizer) -> dict[str, Any]:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": pad}
        if self.temperature > 0:
            return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        # Greedy; the model's generation_config may carry sampling defaults that do not apply then.
        return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def load_for_inference(path: str | Path):
    """Load a model to generate with, the way training left it.

    Args:
        path: a moetune run dir (LoRA adapter or full model), a merged model dir, any local model dir, or a Hub id.

    Returns:
        `(model, tokenizer)`, the model in eval mode. An adapter run's tokenizer (and chat template) is read from
        the run dir when training saved one there.

    Raises:
        MoetuneError: a directory that holds no model or adapter, or a base model that cannot be found.
    """
    from transformers import AutoTokenizer

    from moetune.adapters import load_adapter
    from moetune.loading import load_model
    from moetune.run_info import read_run_dir

    if not Path(path).expanduser().exists():  # a Hub id
        model, tokenizer = load_model(str(path))
    else:
        run = read_run_dir(path)
        model, tokenizer = load_model(run.model_section(), run.quantization, router_fp32=run.router_fp32)
        if run.is_expert_delta:
            from moetune.esft import load_esft

            model = load_esft(model, run.path)
        if run.is_adapter:
            model = load_adapter(model, run.path)
            if run.tokenizer_source == str(run.path):
                tokenizer = AutoTokenizer.from_pretrained(str(run.path))
        if run.router_fp32 and run.quantization is not None:
            from moetune.config import MoESection
            from moetune.router_controls import apply_router_controls

            # The 4-bit base loads its router in fp32, as training had it; route in fp32 as training did.
            apply_router_controls(model, MoESection(router_fp32=True))
    model.eval()
    return model, tokenizer


def encode_prompt(tokenizer, prompt: Prompt, *, raw: bool = False) -> list[int]:
    """Token ids to generate from. Text becomes a user turn of the chat template (with the assistant's generation
    prompt) when the tokenizer has one, unless `raw`; messages always go through the template."""
    if isinstance(prompt, str) and (raw or not getattr(tokenizer, "chat_template", None)):
        return tokenizer(prompt)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise MoetuneError("the tokenizer has no chat template, so chat messages cannot be formatted; give text prompts")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    while messages and messages[-1].get("role") == "assistant":  # an example's reference answer: answer it anew
        messages.pop()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_completions(model, tokenizer, prompts: list[Prompt], settings: GenerationSettings = GenerationSettings(),
                         *, raw: bool = False, batch_size: int = 8) -> list[str]:
    """Complete every prompt; batches are left-padded. Returns the generated text of each (special tokens removed)."""
    import torch
    from transformers import set_seed

    if settings.seed is not None:
        set_seed(settings.seed)
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p, raw=raw) for p in prompts]
    completions = []
    for start in range(0, len(encoded), batch_size):
        batch = tokenizer.pad({"input_ids": encoded[start:start + batch_size]}, padding=True, padding_side="left",
                              return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch.to(device), **settings.generate_kwargs(tokenizer))
        width = batch["input_ids"].shape[1]
        completions += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return completions


def stream_reply(model, tokenizer, messages: list[dict[str, str]], settings: GenerationSettings) -> Iterator[str]:
    """The assistant's answer to `messages`, yielded in pieces as the model produces them."""
    import torch
    from transformers import TextIteratorStreamer, set_seed

    if settings.seed is not None:
        set_seed(settings.seed)
    ids = torch.tensor([encode_prompt(tokenizer, messages)], device=next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                               **settings.generate_kwargs(tokenizer))
        except BaseException as err:  # noqa: BLE001 -- re-raised in the caller's thread below
            failure.append(err)
            streamer.end()  # unblock the reader

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failure:
        raise failure[0]


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


CHAT_HELP = "/reset starts a new conversation, /quit (or Ctrl-D) exits."


def chat_session(model, tokenizer, settings: GenerationSettings = GenerationSettings(), *,
                 read: Callable[[str], str] = input, write: Callable[[str], None] = _write_stdout) -> None:
    """An interactive chat: read a line, stream the answer, keep the conversation until `/reset`.

    Args:
        model, tokenizer: from `load_for_inference`; the tokenizer needs a chat template.
        settings: decoding settings for every answer.
        read: prompts for and returns one line (raises EOFError at the end of input).
        write: writes text as it arrives.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise MoetuneError("this model's tokenizer has no chat template; use `moetune generate --raw` for text completion")
    write(f"{CHAT_HELP}\n")
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = read(">>> ").strip()
        except EOFError:
            write("\n")
            return
        if line == "/quit":
            return
        if line == "/reset":
            messages = []
            write("(new conversation)\n")
            continue
        if line.startswith("/"):
            write(f"unknown command {line}. {CHAT_HELP}\n")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        pieces = []
        for piece in stream_reply(model, tokenizer, messages, settings):
            pieces.append(piece)
            write(piece)
        write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces).strip()})


def read_prompts(file: str | Path) -> list[tuple[dict[str, Any], Prompt]]:
    """(row, prompt) per line of a .jsonl file; a row is {"prompt": text or messages} or {"messages": [...]}."""
    path = Path(file)
    if not path.is_file():
        raise MoetuneError(f"prompts file {str(file)!r} not found")
    try:
        text = decode_utf8(path.read_bytes())
    except NotUtf8Text as err:
        raise MoetuneError(f"prompts file {str(file)!r}: {err}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MoetuneError(f"{path.name}:{number}: not valid JSON ({err.msg})") from None
        prompt = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
            raise MoetuneError(f'{path.name}:{number}: a row needs "prompt" (text or messages) or "messages"')
        rows.append((row, prompt))
    if not rows:
        raise MoetuneError(f"prompts file {str(file)!r} has no rows")
    return rows


def complete_rows(model, tokenizer, rows: list[tuple[dict[str, Any], Prompt]],
                  settings: GenerationSettings = GenerationSettings(), *, raw: bool = False,
                  batch_size: int = 8) -> list[dict[str, Any]]:
    """Complete `(row, prompt)` pairs (from `read_prompts`); each result is the row's other fields plus
    `prompt` and `completion`."""
    completions = generate_completions(model, tokenizer, [p for _, p in rows], settings, raw=raw, batch_size=batch_size)
    return [{**{k: v for k, v in row.items() if k not in ("prompt", "messages")}, "prompt": prompt, "completion": text}
            for (row, prompt), text in zip(rows, completions)]


def write_jsonl(rows: list[dict[str, Any]], out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
