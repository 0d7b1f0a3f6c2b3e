"""User mistakes end in one clear line that names the file, line, row or key, never in a traceback.

Each test goes through a real entry point (`moetune.cli.main`, `load_recipe`, `load_datasets`, `load_model`).
"""

import codecs
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from moetune.cli import main
from moetune.config import DataSection, load_recipe
from moetune.data import load_datasets
from moetune.errors import MoetuneError, RecipeError
from moetune.loading import load_model


REPO = Path(__file__).resolve().parent.parent
DEMO_TRAIN = str(REPO / "recipes/data/demo_train.jsonl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def tok():
    from moetune.tiny import build_tokenizer

    return build_tokenizer()


def recipe_text(model_dir: Path, tmp_path: Path, **sections) -> str:
    recipe = {"model": {"name_or_path": str(model_dir)}, "data": {"train": DEMO_TRAIN},
              "output": {"dir": str(tmp_path / "out")}, **sections}
    return "# recipe for the café demo\n" + yaml.safe_dump(recipe, allow_unicode=True)


def copy_model(tiny_model_dir, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir("mixtral"), tmp_path / "model"))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# ------------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("encoding, expected", [
    ("latin-1", "byte 0xe9 at line 1 (byte offset 20)"),  # the é of "café" in the header comment
    ("utf-16", "UTF-16 byte-order mark"),
    ("utf-16-le", "looks like UTF-16"),
])
def test_recipe_not_utf8_names_file_and_place(tiny_model_dir, tmp_path, capsys, encoding, expected):
    path = tmp_path / "my recipe.yaml"
    path.write_bytes(recipe_text(tiny_model_dir("mixtral"), tmp_path).encode(encoding))
    code, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    line = next(line for line in err.splitlines() if "not UTF-8" in line)  # one line says it all
    assert line.startswith(f"moetune validate: error: {path}: not UTF-8 text")
    assert expected in line and "save it as UTF-8" in line


def test_recipe_with_utf8_bom_is_accepted(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "bom.yaml"
    path.write_bytes(codecs.BOM_UTF8 + recipe_text(tiny_model_dir("mixtral"), tmp_path).encode("utf-8"))
    assert main(["validate", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.mkdir(), "is a directory, not a recipe file"),
    (lambda p: p.write_text("# only a comment\n"), "the recipe is empty"),
    (lambda p: p.write_bytes(bytes(range(256)) * 4), "looks like a binary file"),
])
def test_recipe_directory_empty_or_binary(tmp_path, capsys, make, expected):
    path = tmp_path / "recipe.yaml"
    make(path)
    code, err = run_cli(capsys, "train", str(path))
    assert code == 2 and str(path) in err and expected in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, key", [
    ("moe.aux_loss_coef=.inf", "moe.aux_loss_coef"),
    ("train.learning_rate=.nan", "train.learning_rate"),
    ("lora.alpha=.inf", "lora.alpha"),
    ("train.lr_scheduler_kwargs={min_lr: -.inf}", "train.lr_scheduler_kwargs.min_lr"),
])
def test_non_finite_numbers_are_rejected_with_the_key(tiny_model_dir, tmp_path, capsys, override, key):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(tiny_model_dir("mixtral"), tmp_path), encoding="utf-8")
    code, err = run_cli(capsys, "validate", str(path), "--set", override)
    assert code == 2 and f"`{key}` must be a finite number" in err


def test_train_values_of_the_wrong_type_are_named_before_training(tiny_model_dir, tmp_path, capsys):
    """TrainingArguments does not check types: `max_steps: abc` used to end in a raw TypeError once training began
    (and `moetune validate` said OK)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(tiny_model_dir("mixtral"), tmp_path), encoding="utf-8")
    overrides = ["train.max_steps=abc", "train.per_device_train_batch_size=2.5", "train.learning_rate=fast",
                 "train.bf16=3", "train.save_total_limit=null", "train.warmup_steps=10", "train.save_steps=0.5"]
    code, err = run_cli(capsys, "train", str(path), *[arg for o in overrides for arg in ("--set", o)])
    assert code == 2 and "Traceback" not in err
    assert "`train.max_steps` must be an integer, got 'abc'" in err
    assert "`train.per_device_train_batch_size` must be an integer, got 2.5" in err
    assert "`train.learning_rate` must be a number, got 'fast'" in err
    assert "`train.bf16` must be true or false, got 3" in err
    assert err.count(" must be ") == 4  # null where allowed, an integer for a float field, a float ratio: fine
    assert not (tmp_path / "out").exists()


def test_non_finite_number_in_yaml_file(tiny_model_dir, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(tiny_model_dir("mixtral"), tmp_path) + "moe:\n  z_loss_coef: .nan\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"`moe.z_loss_coef` must be a finite number, got nan"):
        load_recipe(path)


@pytest.mark.parametrize("key", ["hub_token", "push_to_hub_token"])
def test_tokens_are_refused_without_echoing_them(tiny_model_dir, tmp_path, capsys, key):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(tiny_model_dir("mixtral"), tmp_path), encoding="utf-8")
    code, err = run_cli(capsys, "validate", str(path), "--set", f"train.{key}=hf_SeCrEt123")
    assert code == 2 and f"`train.{key}`: tokens never go in a recipe" in err
    assert "HF_TOKEN" in err and "hf auth login" in err and "hf_SeCrEt123" not in err
    assert "unknown key" not in err  # one reason per key


@pytest.mark.parametrize("sections, expected", [
    ({"moe": {"aux_loss": False, "aux_loss_coef": 0.02}}, "`moe.aux_loss_coef` (0.02) has no effect"),
    ({"train": {"max_steps": 0}}, "`train.max_steps: 0` is not a limit"),
    ({"train": {"num_train_epochs": 0}}, "`train.num_train_epochs: 0` trains for zero steps"),
])
def test_suspicious_settings_warn_once(tiny_model_dir, tmp_path, capsys, caplog, sections, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(tiny_model_dir("mixtral"), tmp_path, **sections), encoding="utf-8")
    code, err = run_cli(capsys, "validate", str(path))
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and expected in warnings[0]
    with caplog.at_level(logging.WARNING, logger="moetune.config"):
        load_recipe(path)
    assert [r.name for r in caplog.records] == ["moetune.config"] and expected in caplog.records[0].message


# ---------------------------------------------------------------------------------------------------- data


CHAT_ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def write_rows(path: Path, rows: list[dict], bad_row: int | None = None) -> str:
    """Rows in the file's format; the row at index `bad_row` gets a latin-1 "é" in its answer."""
    rows = [dict(r) for r in rows]
    if path.suffix == ".csv":
        lines = ["prompt,completion"] + [f"{r['prompt']},{r['completion']}" for r in rows]
        texts = [line.encode() for line in lines]
        offset = 1  # the header
    else:
        texts = [json.dumps(r).encode() for r in rows]
        offset = 0
    if bad_row is not None:
        texts[bad_row + offset] = texts[bad_row + offset].replace(b"Hello", b"H\xe9llo")
    if path.suffix == ".json":
        path.write_bytes(b"[\n" + b",\n".join(texts) + b"\n]\n")
    else:
        path.write_bytes(b"\n".join(texts) + b"\n")
    return str(path)


@pytest.mark.parametrize("suffix, bad_line", [(".jsonl", 3), (".json", 4), (".csv", 4)])
def test_data_not_utf8_names_key_file_and_line(tmp_path, tok, suffix, bad_line):
    rows = [{"prompt": "Say hi", "completion": "Hello"}] * 4 if suffix == ".csv" else [CHAT_ROW] * 4
    good = write_rows(tmp_path / f"good{suffix}", rows)
    bad = write_rows(tmp_path / f"bad{suffix}", rows, bad_row=2)
    with pytest.raises(MoetuneError) as err:
        load_datasets(DataSection(train=good, eval=bad), tok)
    assert str(err.value).startswith(f"`data.eval`: {bad}: not UTF-8 text: byte 0xe9 at line {bad_line} ")
    assert "latin-1" in str(err.value)


def test_data_with_utf8_bom_loads(tmp_path, tok):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + (json.dumps(CHAT_ROW) + "\n").encode() * 2)
    loaded = load_datasets(DataSection(train=str(path)), tok)
    assert loaded.report.splits["train"].kept == 2 and loaded.report.splits["train"].malformed == 0


def test_truncated_parquet_names_the_file(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "The quick brown fox."}] * 20), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MoetuneError, match=r"`data.train`: .*train.parquet is not a readable parquet file \(truncated"):
        load_datasets(DataSection(train=str(path)), tok)


def test_empty_answers_and_rows_of_another_format_warn(tmp_path, tok, caplog):
    empty = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}
    other = {"prompt": "Say hi", "completion": "Hello"}
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [CHAT_ROW, empty, CHAT_ROW, other, empty, other]))
    with caplog.at_level(logging.WARNING, logger="moetune.data"):
        loaded = load_datasets(DataSection(train=str(path)), tok)
    messages = [r.message for r in caplog.records if r.name == "moetune.data"]
    assert messages == [
        "`data.train`: 2 assistant turns with empty content (first: chat.jsonl:2); the model learns to answer them "
        "with nothing",
        "`data.train`: 2 rows of messages data have prompt_completion columns (prompt, completion) (first: "
        "chat.jsonl:4); only the messages columns are read",
    ]
    report = loaded.report.splits["train"]
    assert report.warnings == messages
    assert report.malformed == 2 and report.kept == 4  # the per-row report is unchanged: those rows are malformed


# --------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("key, value, expected", [
    ("num_local_experts", "eight", "Field 'num_local_experts' expected int, got str (value: 'eight')"),
    ("hidden_size", None, "Field 'hidden_size' expected int, got NoneType"),
    ("num_hidden_layers", [2], "Field 'num_hidden_layers' expected int, got list"),
    ("num_attention_heads", 0, "`num_attention_heads` must be a positive integer, got 0"),
])
def test_config_json_with_wrong_types(tiny_model_dir, tmp_path, capsys, key, value, expected):
    model = copy_model(tiny_model_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, key: value}))
    code, err = run_cli(capsys, "inspect", str(model))
    assert code == 1 and f"{model / 'config.json'}: {expected}" in err
    with pytest.raises(MoetuneError, match=f"model.name_or_path: {model / 'config.json'}: "):
        load_model(str(model))


def truncate_weights(model: Path) -> str:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return f"{weights} is truncated or damaged"


def delete_weights(model: Path) -> str:
    (model / "model.safetensors").unlink()
    return f"cannot load the weights of '{model}': Error no file named model.safetensors"


def shard_with_missing_file(model: Path) -> str:
    from safetensors import safe_open

    shard = model / "model-00001-of-00002.safetensors"
    (model / "model.safetensors").rename(shard)
    with safe_open(str(shard), "pt") as f:
        names = list(f.keys())
    weight_map = {name: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, name in enumerate(names)}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return "model.safetensors.index.json names 1 shard file that is missing: model-00002-of-00002.safetensors"


@pytest.mark.parametrize("damage", [truncate_weights, delete_weights, shard_with_missing_file])
def test_truncated_or_missing_weights_name_the_file(tiny_model_dir, tmp_path, damage):
    model = copy_model(tiny_model_dir, tmp_path)
    expected = damage(model)
    with pytest.raises(MoetuneError) as err:
        load_model(str(model))
    assert str(err.value).startswith("model.name_or_path: ") and expected in str(err.value)


def test_missing_tokenizer_fails_before_the_weights_are_read(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path)
    for name in TOKENIZER_FILES:
        (model / name).unlink()
    truncate_weights(model)  # the tokenizer error must come first, so the weights are never opened
    with pytest.raises(MoetuneError, match=f"model.name_or_path: {model} has no tokenizer"):
        load_model(str(model))


def test_weights_only_folder_loads_and_inspects_without_a_tokenizer(tiny_model_dir, tmp_path, capsys):
    model = copy_model(tiny_model_dir, tmp_path)
    for name in TOKENIZER_FILES:
        (model / name).unlink()
    loaded, tokenizer = load_model(str(model), with_tokenizer=False)
    assert tokenizer is None and loaded.config.model_type == "mixtral"
    assert main(["inspect", str(model), "--quantize", "4bit"]) == 0
    out = capsys.readouterr().out
    assert "measured 4-bit:" in out and "buffers" in out  # the table also prints groups only measured
