"""`moetune chat` / `moetune generate`: a run dir loads as training left it, batches, streaming, the REPL in a pty."""

import json
import os
import re
import select
import subprocess
import sys
import time

import pytest
import torch
from tiny_runs import REPO, make_run

from moetune.adapters import load_adapter
from moetune.cli import main
from moetune.config import ModelSection, QuantizationSection
from moetune.inference import (
    GenerationSettings,
    chat_session,
    generate_completions,
    load_for_inference,
    stream_reply,
)
from moetune.loading import load_model


GREEDY = GenerationSettings(max_new_tokens=6)
IDS = torch.randint(6, 400, (1, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    """Expert + attention LoRA trained on a 4-bit base."""
    return make_run(tmp_path_factory.mktemp("inference") / "run", tiny_model_dir("mixtral"),
                    targets=["experts", "attention"], quantized=True)


@pytest.fixture(scope="module")
def loaded(qlora_run):
    return load_for_inference(qlora_run)


def test_a_4bit_run_loads_as_trained(qlora_run, loaded, tiny_model_dir):
    model, tokenizer = loaded
    assert model.base_model.model.is_loaded_in_4bit and not model.training
    assert tokenizer.chat_template  # from the run dir
    section = ModelSection(name_or_path=str(tiny_model_dir("mixtral")), dtype="float32")
    expected = load_adapter(load_model(section, QuantizationSection())[0], qlora_run)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected(IDS).logits, atol=0, rtol=0)


def test_full_model_dirs_and_merged_dirs_load_as_they_are(tiny_model_dir):
    model, _ = load_for_inference(tiny_model_dir("qwen3_moe"))
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.dtype == torch.float32  # the saved dtype


def test_streamed_reply_is_the_greedy_completion(loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "What is 7 times 8?"}]
    pieces = list(stream_reply(model, tokenizer, messages, GREEDY))
    assert "".join(pieces) == generate_completions(model, tokenizer, [messages], GREEDY)[0]


def test_chat_session_keeps_history_until_reset(loaded):
    model, tokenizer = loaded
    seen = []
    original = tokenizer.apply_chat_template
    lines = iter(["hello", "and again", "/reset", "fresh", "/nope"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    def record(messages, **kwargs):
        seen.append([m["role"] for m in messages])
        return original(messages, **kwargs)

    tokenizer.apply_chat_template = record
    written = []
    try:
        chat_session(model, tokenizer, GREEDY, read=read, write=written.append)
    finally:
        del tokenizer.apply_chat_template
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]
    assert "(new conversation)\n" in written and any("unknown command /nope" in w for w in written)


def test_generate_file_and_prompt(qlora_run, loaded, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": 1, "prompt": "What is 7 times 8?"}, {"id": 2, "prompt": "Hello"},
            {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(qlora_run), "--file", str(prompts), "--out", str(out), "--max-new-tokens", "6",
                 "--batch-size", "2"]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    model, tokenizer = loaded
    one_by_one = [generate_completions(model, tokenizer, [r.get("prompt", r.get("messages"))], GREEDY)[0] for r in rows]
    assert [r["completion"] for r in results] == one_by_one  # left-padded batches decode like single prompts
    assert results[0]["id"] == 1 and results[0]["prompt"] == "What is 7 times 8?"
    assert results[2]["prompt"] == rows[2]["messages"] and "id" not in results[2]

    capsys.readouterr()
    assert main(["generate", str(qlora_run), "--prompt", "What is 7 times 8?", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == one_by_one[0] + "\n"


def test_sampling_is_seeded(loaded):
    model, tokenizer = loaded
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    first = generate_completions(model, tokenizer, ["Hello", "Count"], settings)
    assert generate_completions(model, tokenizer, ["Hello", "Count"], settings) == first


@pytest.mark.parametrize("args, message", [
    (["--top-p", "0"], "--top-p must be in"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--file", "missing.jsonl"], "prompts file 'missing.jsonl' not found"),
])
def test_generate_user_errors(qlora_run, capsys, args, message):
    command = ["generate", str(qlora_run), *args] + ([] if "--file" in args else ["--prompt", "hi"])
    assert main(command) == 1
    assert message in capsys.readouterr().err


def test_a_prompts_file_in_another_encoding_is_named_not_a_traceback(qlora_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n', encoding="utf-16")
    assert main(["generate", str(qlora_run), "--file", str(prompts)]) == 1
    err = capsys.readouterr().err
    assert f"prompts file {str(prompts)!r}: not UTF-8 text" in err and "UTF-16" in err and "Traceback" not in err


def test_routing_of_a_run_dir_measures_the_trained_model(qlora_run, loaded, tmp_path, capsys):
    """`moetune routing RUN_DIR DATA` loads base + adapter as `generate` does (it refused a LoRA run dir before)."""
    from moetune.config import DataSection
    from moetune.data import load_datasets
    from moetune.telemetry import measure_routing

    data = str(REPO / "recipes/data/demo_eval.jsonl")
    assert main(["routing", str(qlora_run), data, "--max-examples", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model, tokenizer = loaded
    rows = load_datasets(DataSection(train=data, max_length=512), tokenizer).train.select(range(8))
    expected = measure_routing(model, tokenizer, rows, batch_size=8, max_length=512)
    assert report["tokens"] == expected["tokens"] > 0
    assert [layer["share"] for layer in report["layers"]] == [layer["share"] for layer in expected["layers"]]


def _read_until(fd, pattern: bytes, seen: bytearray, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} within {timeout}s; got {bytes(seen[-500:])!r}")
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    match = re.search(pattern, seen)
    assert match, f"{pattern!r} not in {bytes(seen[-500:])!r}"
    out = bytes(seen[:match.end()])
    del seen[:match.end()]
    return out


def test_chat_in_a_terminal(qlora_run, loaded):
    model, tokenizer = loaded
    expected = generate_completions(model, tokenizer, ["What is 7 times 8?"], GREEDY)[0]
    assert expected.strip()
    controller, terminal = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "moetune", "chat", str(qlora_run), "--max-new-tokens", "6"],
                            stdin=terminal, stdout=terminal, stderr=terminal, cwd=REPO, close_fds=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(terminal)
    seen = bytearray()
    try:
        assert b"/reset" in _read_until(controller, rb">>> ", seen, timeout=120)
        os.write(controller, b"What is 7 times 8?\n")
        reply = _read_until(controller, rb">>> ", seen, timeout=60).replace(b"\r\n", b"\n")
        assert expected.encode() in reply  # the streamed answer, printed as it came
        os.write(controller, b"/reset\n")
        assert b"(new conversation)" in _read_until(controller, rb">>> ", seen, timeout=30)
        os.write(controller, b"/quit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
