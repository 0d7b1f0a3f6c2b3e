"""Data loading: each format and file type, auto-detection, the loss masks TRL consumes, the drop report."""

import csv
import json

import pytest

from moetune.config import DataSection
from moetune.data import load_datasets
from moetune.errors import MoetuneError


@pytest.fixture(scope="module")
def tok():
    from moetune.tiny import build_tokenizer

    return build_tokenizer()


CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What day comes after Monday?"},
                      {"role": "assistant", "content": "Tuesday."}]},
        {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "one two three"},
                      {"role": "user", "content": "And back?"}, {"role": "assistant", "content": "three two one"}]}]
PAIRS = [{"prompt": "Q: colour of the sky?\nA:", "completion": " blue"}, {"prompt": "Q: 2+2?\nA:", "completion": " four"}]
ALPACA = [{"instruction": "Reverse the list.", "input": "cat, dog", "output": "dog, cat"},
          {"instruction": "Say hello.", "input": "", "output": "hello"}]
TEXT = [{"text": "The quick brown fox."}, {"text": "Jumps over the lazy dog."}]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps({"data": rows}))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def answers(tok, row, mask_col):
    """Decode the tokens the loss is computed on, one string per contiguous run."""
    runs, current = [], []
    for token, m in zip(row["input_ids"], row[mask_col]):
        if m:
            current.append(token)
        elif current:
            runs, current = runs + [tok.decode(current)], []
    return runs + ([tok.decode(current)] if current else [])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_messages_assistant_only(tmp_path, tok, suffix):
    loaded = load_datasets(DataSection(train=write(tmp_path / f"chat{suffix}", CHAT)), tok)
    assert loaded.report.splits["train"].format == "messages"
    assert loaded.train.column_names == ["input_ids", "assistant_masks"]
    assert answers(tok, loaded.train[0], "assistant_masks") == ["Tuesday.<|im_end|>"]
    assert answers(tok, loaded.train[1], "assistant_masks") == ["one two three<|im_end|>", "three two one<|im_end|>"]
    assert "Be brief." in tok.decode(loaded.train[0]["input_ids"]) and loaded.eval is None


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_prompt_completion(tmp_path, tok, suffix):
    loaded = load_datasets(DataSection(train=write(tmp_path / f"pc{suffix}", PAIRS)), tok)
    row = loaded.train[0]
    assert loaded.report.splits["train"].format == "prompt_completion"
    assert tok.decode(row["input_ids"]) == "Q: colour of the sky?\nA: blue<|im_end|>"  # EOS appended, as TRL does
    assert answers(tok, row, "completion_mask") == [" blue<|im_end|>"]


def test_conversational_prompt_completion(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Hello."}]}]
    loaded = load_datasets(DataSection(train=write(tmp_path / "pc.jsonl", rows)), tok)
    assert answers(tok, loaded.train[0], "completion_mask") == ["Hello.<|im_end|>\n"]
    assert tok.decode(loaded.train[0]["input_ids"]).startswith("<|im_start|>user\nHi?<|im_end|>")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_alpaca_becomes_a_chat_turn(tmp_path, tok, suffix):
    loaded = load_datasets(DataSection(train=write(tmp_path / f"alpaca{suffix}", ALPACA)), tok)
    assert loaded.report.splits["train"].format == "alpaca"
    text = tok.decode(loaded.train[0]["input_ids"])
    assert text.startswith("<|im_start|>user\nReverse the list.\n\ncat, dog<|im_end|>\n<|im_start|>assistant\n")
    assert answers(tok, loaded.train[0], "completion_mask") == ["dog, cat<|im_end|>\n"]
    assert tok.decode(loaded.train[1]["input_ids"]).startswith("<|im_start|>user\nSay hello.<|im_end|>")  # no empty input


def test_alpaca_without_chat_template_uses_alpaca_prompt(tmp_path, tok):
    plain = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>", pad_token="<pad>")
    loaded = load_datasets(DataSection(train=write(tmp_path / "a.jsonl", ALPACA)), plain)
    text = plain.decode(loaded.train[0]["input_ids"])
    assert "### Instruction:\nReverse the list.\n\n### Input:\ncat, dog\n\n### Response:\ndog, cat" in text
    assert answers(plain, loaded.train[0], "completion_mask") == ["dog, cat<|im_end|>"]


def test_text_trains_on_everything(tmp_path, tok):
    loaded = load_datasets(DataSection(train=write(tmp_path / "t.parquet", TEXT), eval=write(tmp_path / "e.csv", TEXT)), tok)
    assert loaded.train.column_names == ["input_ids"] and loaded.eval.column_names == ["input_ids"]
    assert tok.decode(loaded.train[1]["input_ids"]) == "Jumps over the lazy dog.<|im_end|>"
    assert loaded.report.splits["eval"].format == "text"


def test_full_loss_when_assistant_only_is_off(tmp_path, tok):
    path = write(tmp_path / "chat.jsonl", CHAT)
    assert load_datasets(DataSection(train=path, assistant_only_loss=False), tok).train.column_names == ["input_ids"]
    path = write(tmp_path / "pc.jsonl", PAIRS)
    assert load_datasets(DataSection(train=path, assistant_only_loss=False), tok).train.column_names == ["input_ids"]


def test_malformed_and_too_long_rows_are_counted_with_their_place(tmp_path, tok):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(CHAT[0]), "{not json", json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
             "", json.dumps({"messages": "oops"}), json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
             json.dumps({"messages": [{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": "ok"}]}),
             json.dumps(CHAT[1])]
    path.write_text("\n".join(lines) + "\n")
    loaded = load_datasets(DataSection(train=str(path), format="messages", max_length=64), tok)
    rep = loaded.report.splits["train"]
    assert (rep.rows_read, rep.kept, rep.malformed, rep.too_long) == (7, 2, 4, 1)
    assert len(loaded.train) == 2
    assert rep.malformed_examples[0].startswith("mixed.jsonl:2: not valid JSON")
    assert rep.malformed_examples[1] == "mixed.jsonl:3: no assistant message to train on"
    assert rep.malformed_examples[2].startswith("mixed.jsonl:5: `messages` must be a non-empty list")
    assert rep.malformed_examples[3].startswith("mixed.jsonl:6: `messages[0]` must be {role:")
    assert rep.too_long_examples[0].startswith("mixed.jsonl:7:") and "> max_length 64" in rep.too_long_examples[0]
    assert "4 malformed, 1 longer than max_length" in loaded.report.format_text()


def test_empty_after_filtering_is_an_error(tmp_path, tok):
    path = write(tmp_path / "short.jsonl", TEXT)
    with pytest.raises(MoetuneError, match=r"(?s)`data.train` has no usable rows left.*2 longer than max_length"):
        load_datasets(DataSection(train=path, max_length=3), tok)


def test_unknown_columns_name_the_columns(tmp_path, tok):
    path = write(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(MoetuneError, match=r"cannot tell the format .* columns \['answer', 'question'\]"):
        load_datasets(DataSection(train=path), tok)


def test_forced_format_reports_rows_that_do_not_fit(tmp_path, tok):
    path = write(tmp_path / "t.jsonl", TEXT + PAIRS)
    loaded = load_datasets(DataSection(train=path, format="text"), tok)
    rep = loaded.report.splits["train"]
    assert rep.kept == 2 and rep.malformed == 2 and "`text` must be non-empty text, got None" in rep.malformed_examples[0]


def test_hub_dataset_offline_gives_a_clear_error(tok):
    with pytest.raises(MoetuneError, match=r"`data.train`: could not load Hub dataset 'someone/some-data' \(split 'test'\)"):
        load_datasets(DataSection(train="someone/some-data:test"), tok)


def test_trl_builds_labels_from_our_masks(tmp_path, tok):
    """The columns are what SFTTrainer expects: its labels are -100 exactly where our mask is 0."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from moetune.tiny import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    for rows, col in ((CHAT, "assistant_masks"), (PAIRS, "completion_mask")):
        loaded = load_datasets(DataSection(train=write(tmp_path / "d.jsonl", rows)), tok)
        args = SFTConfig(output_dir=str(tmp_path / "o"), use_cpu=True, bf16=False, report_to="none",
                         completion_only_loss=True, shuffle_dataset=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=loaded.train, processing_class=tok)
        for ours, prepared in zip(loaded.train, trainer.train_dataset):
            assert prepared["input_ids"] == ours["input_ids"]
            assert prepared["labels"] == [t if m else -100 for t, m in zip(ours["input_ids"], ours[col])]
