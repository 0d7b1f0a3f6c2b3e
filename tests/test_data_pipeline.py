"""Data through `datasets`: the tokenized cache, `max_rows`, parallel tokenizing, the ShareGPT format and
`moetune data` (the report and samples with the loss mask, for every format)."""

import json
import logging
import os
import time

import pytest
import yaml

from moetune.cli import main
from moetune.config import DataSection
from moetune.data import load_datasets


@pytest.fixture(scope="module")
def tok():
    from moetune.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Each test gets its own empty tokenized-data cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return tmp_path / "hf-datasets" / "moetune"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(i):
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"},
                               {"from": "gpt", "value": "Paris."}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                               {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye."}]},
            {"conversations": [{"from": "alien", "value": "?"}]}]


def trained_text(tok, row, col):
    return [tok.decode([t for t, m in zip(row["input_ids"], row[col]) if m])]


def test_sharegpt_is_detected_and_masks_the_gpt_turns(tmp_path, tok):
    loaded = load_datasets(DataSection(train=write_jsonl(tmp_path / "sg.jsonl", SHAREGPT)), tok)
    rep = loaded.report.splits["train"]
    assert rep.format == "sharegpt" and loaded.train.column_names == ["input_ids", "assistant_masks"]
    assert tok.decode(loaded.train[0]["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert trained_text(tok, loaded.train[1], "assistant_masks") == ["Hello.<|im_end|>Goodbye.<|im_end|>"]
    assert rep.malformed == 1 and rep.malformed_examples[0].startswith("sg.jsonl:3: `conversations[0]` must be {from:")


def test_second_load_comes_from_the_cache_until_the_file_changes(tmp_path, tok, cache_dir, caplog):
    empty = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}
    rows = [chat(i) for i in range(20)] + [empty, {"messages": "oops"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    first = load_datasets(DataSection(train=path), tok)
    assert not first.report.splits["train"].cached and len(list(cache_dir.iterdir())) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moetune.data"):
        second = load_datasets(DataSection(train=path), tok)
    rep = second.report.splits["train"]
    assert rep.cached and second.train[:] == first.train[:]
    assert (rep.rows_read, rep.kept, rep.malformed, rep.malformed_examples) == (22, 21, 1, first.report.splits["train"].malformed_examples)
    assert [r.message for r in caplog.records] == rep.warnings and "empty content" in rep.warnings[0]  # said again
    # Another max_length, another tokenizer or a changed file is another entry.
    assert not load_datasets(DataSection(train=path, max_length=16), tok).report.splits["train"].cached
    write_jsonl(tmp_path / "c.jsonl", rows[:5])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = load_datasets(DataSection(train=path), tok)
    assert not changed.report.splits["train"].cached and changed.report.splits["train"].rows_read == 5
    assert not load_datasets(DataSection(train=path), tok, cache=False).report.splits["train"].cached


def test_cache_makes_the_second_load_of_50k_rows_10x_faster(tmp_path, tok):
    """The one timed test (issue 12 asks for the speed-up): a rerun or --resume must not tokenize again."""
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}: the quick brown fox jumps over the lazy dog"}) + "\n"
                            for i in range(50_000)))
    start = time.perf_counter()
    first = load_datasets(DataSection(train=str(path)), tok)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    second = load_datasets(DataSection(train=str(path)), tok)
    warm = time.perf_counter() - start
    assert len(first.train) == len(second.train) == 50_000 and second.report.splits["train"].cached
    assert warm * 10 <= cold, f"cold {cold:.2f} s, warm {warm:.2f} s"


def test_max_rows_tokenizes_only_what_the_run_needs(tmp_path, tok):
    path = write_jsonl(tmp_path / "many.jsonl", [chat(i) for i in range(1000)])
    loaded = load_datasets(DataSection(train=path, eval=path), tok, max_rows=100)
    rep = loaded.report.splits["train"]
    assert 100 <= rep.kept == rep.rows_read < 1000 and rep.rows_available == 1000
    assert "a fixed sample of 169 of 1000 rows" in rep.format_text()
    assert len(loaded.eval) == 1000  # eval is read whole
    # The sample spans the whole file (a file sorted by task must not train on its first rows only), and it is
    # the same sample every time, cached or not.
    again = load_datasets(DataSection(train=path, eval=path), tok, max_rows=100, cache=False)
    assert again.train["input_ids"] == loaded.train["input_ids"]
    lines = sorted(int(w.rsplit(":", 1)[1]) for w in _where_of(loaded.train, tok, path))
    assert lines[0] < 250 and lines[-1] > 750
    # Rows dropped early on: it reads on until it has enough.
    long_row = {"messages": [{"role": "user", "content": "long " * 100}, {"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "dropped.jsonl", [long_row] * 300 + [chat(i) for i in range(700)])
    rep = load_datasets(DataSection(train=path, max_length=64), tok, max_rows=100).report.splits["train"]
    assert rep.kept >= 100 and rep.too_long > 0 and rep.rows_read < 1000


def test_parallel_tokenizing_gives_the_same_rows_and_report(tmp_path, tok):
    rows = [chat(i) for i in range(40)] + [{"messages": "oops"}] + [chat(i) for i in range(40, 60)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    one = load_datasets(DataSection(train=path), tok, num_proc=1, cache=False)
    two = load_datasets(DataSection(train=path), tok, num_proc=2, cache=False)
    assert two.train[:] == one.train[:]
    assert two.report.splits["train"].malformed_examples == one.report.splits["train"].malformed_examples == [
        "p.jsonl:41: `messages` must be a non-empty list of messages, got str"]


# ------------------------------------------------------------------------------------------------ moetune data

FORMATS = {
    "messages": ([chat(1), chat(2)], "[[answer 1<|im_end|>]]"),
    "sharegpt": (SHAREGPT[:2], "[[Paris.<|im_end|>]]"),
    "prompt_completion": ([{"prompt": "Q: sky?\nA:", "completion": " blue"}] * 2, "Q: sky?\nA:[[ blue<|im_end|>]]"),
    "alpaca": ([{"instruction": "Say hi.", "input": "", "output": "hi"}] * 2, "assistant\n[[hi<|im_end|>\n]]"),
    "text": ([{"text": "The quick brown fox."}] * 2, "[[The quick brown fox.<|im_end|>]]"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_data_command_shows_report_and_masked_samples(tiny_model_dir, tmp_path, capsys, fmt):
    rows, expected = FORMATS[fmt]
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", rows + [{"unrelated": 1}])
    recipe = {"model": {"name_or_path": str(tiny_model_dir("mixtral"))}, "data": {"train": data, "format": fmt},
              "output": {"dir": str(tmp_path / "out")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["data", str(tmp_path / "r.yaml"), "--show", "1", "--set", "data.max_length=100"]) == 0
    out = capsys.readouterr().out
    assert f"train: {data} ({fmt}): 3 rows read, 2 kept" in out and "1 malformed" in out
    assert "tokens per row: p50 " in out and "(max_length 100); trained tokens" in out
    assert out.count("--- train sample") == 1 and expected in out
    assert "\033[" not in out  # no color codes when stdout is not a terminal
    assert not (tmp_path / "out").exists()  # reads the tokenizer only, writes nothing


def _where_of(dataset, tok, path):
    """file:line of each kept row, found by matching its tokens against every row of the file tokenized alone."""
    full = load_datasets(DataSection(train=path), tok, cache=False).train["input_ids"]
    line_of = {tuple(ids): i + 1 for i, ids in enumerate(full)}
    return [f"x:{line_of[tuple(ids)]}" for ids in dataset["input_ids"]]


def test_cache_evicts_the_least_recently_used_entries_over_its_limit(tmp_path, tok, cache_dir, monkeypatch):
    paths = [write_jsonl(tmp_path / f"d{i}.jsonl", [chat(j) for j in range(10 + i)]) for i in range(3)]
    load_datasets(DataSection(train=paths[0]), tok)
    load_datasets(DataSection(train=paths[1]), tok)
    entries = {p.name for p in cache_dir.iterdir()}
    assert len(entries) == 2
    one_entry = max(sum(f.stat().st_size for f in e.rglob("*") if f.is_file()) for e in cache_dir.iterdir())
    first = next(e for e in cache_dir.iterdir() if json.loads((e / "report.json").read_text())["rows_read"] == 10)
    second = next(e for e in cache_dir.iterdir() if e != first)
    os.utime(first / "report.json", (time.time() - 100, time.time() - 100))
    os.utime(second / "report.json", (time.time() - 50, time.time() - 50))
    assert load_datasets(DataSection(train=paths[0]), tok).report.splits["train"].cached  # a read marks d0 used
    # Room for two entries: writing a third removes the least recently used one, d1 (d0 was just read).
    monkeypatch.setenv("MOETUNE_DATA_CACHE_GB", str(2.5 * one_entry / 1024**3))
    load_datasets(DataSection(train=paths[2]), tok)
    left = {p.name for p in cache_dir.iterdir()}
    assert first.name in left and second.name not in left and len(left) == 2
    assert load_datasets(DataSection(train=paths[0]), tok).report.splits["train"].cached
    assert not load_datasets(DataSection(train=paths[1]), tok).report.splits["train"].cached
