"""Packaged recipes: every one lists, copies and validates by name; `cp` never clobbers; unknown names get help."""

import subprocess
from pathlib import Path

import pytest
import yaml

from moetune.catalog import (
    ACCELERATE_DIR,
    RECIPES_DIR,
    accelerate_names,
    copy_recipe,
    format_table,
    recipe_names,
    recipe_summary,
    resolve_recipe_source,
)
from moetune.cli import main
from moetune.config import load_recipe
from moetune.errors import MoetuneError, RecipeError


REPO = Path(__file__).resolve().parent.parent
NAMES = recipe_names()


def _schema_overrides(name: str, tmp_path: Path) -> list[str]:
    """As in test_recipes.py: a recipe that names a local model dir (the demo's `./runs/tiny-mixtral`, made by
    `moetune tiny`) gets one; `--schema-only` needs only that it exists."""
    raw = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    return [f"model.name_or_path={tmp_path}"] if raw["model"]["name_or_path"].startswith(".") else []


def test_the_repository_link_is_the_package_dir():
    assert (REPO / "recipes").resolve() == RECIPES_DIR
    assert {"demo", "mixtral/8x7b_qlora_attention", "qwen3_moe/30b_a3b_qlora_experts"} <= set(NAMES)
    assert {p.stem for p in ACCELERATE_DIR.glob("*.yaml")} == {n.split("/")[1] for n in accelerate_names()}
    assert not any(n.startswith("accelerate/") for n in NAMES)
    try:
        staged = subprocess.run(["git", "ls-files", "-s", "recipes"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    assert staged.startswith("120000 "), "git must store recipes/ as a symlink, not a copy"


def test_pyproject_ships_every_packaged_file():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["moetune"]
    shipped = {p for g in globs for p in (REPO / "moetune").glob(g)}
    assert {p for p in RECIPES_DIR.rglob("*") if p.is_file()} <= shipped


def test_listing_names_every_recipe_and_accelerate_config(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        row = recipe_summary(name)
        assert row["memory"] != "?" and row["gpus"] != "?", f"{name}: header lacks `# memory: ..., GPUs: ...`"
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert row["model"] in line and row["method"] in line and row["gpus"] in line
    for name in accelerate_names():
        assert str(RECIPES_DIR / f"{name}.yaml") in out
    assert out.strip() == format_table()


def test_method_column_reads_the_sections():
    methods = {name: recipe_summary(name)["method"] for name in NAMES}
    assert methods["mixtral/8x7b_qlora_attention"] == "QLoRA attention"
    assert methods["qwen3_moe/30b_a3b_qlora_experts"] == "QLoRA attention+experts"
    assert methods["granitemoe/3.1_3b_a800m_lora"] == "LoRA attention+experts, full router"
    assert methods["olmoe/1b_7b_non_experts"] == "full non_experts"
    assert methods["demo"] == "full"


@pytest.mark.parametrize("name", NAMES)
def test_copy_then_validate_by_name(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the demo's data paths are relative to the repository root
    source = RECIPES_DIR / f"{name}.yaml"
    assert main(["recipes", "cp", name, str(tmp_path)]) == 0
    copied = tmp_path / source.name
    assert copied.read_bytes() == source.read_bytes()  # header included
    overrides = _schema_overrides(name, tmp_path)
    args = ["validate", name, "--schema-only"] + [a for o in overrides for a in ("--set", o)]
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    assert "OK" in capsys.readouterr().out
    assert load_recipe(name, overrides) == load_recipe(copied, overrides)


def test_path_forms_and_an_existing_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    demo = RECIPES_DIR / "demo.yaml"
    assert resolve_recipe_source("demo").resolve() == demo
    assert resolve_recipe_source("demo.yaml").resolve() == demo
    assert resolve_recipe_source("recipes/demo.yaml").resolve() == demo  # the repository path itself
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe_source("recipes/demo.yaml") == demo  # outside the repository: the packaged one
    (tmp_path / "demo").write_text(demo.read_text().replace("dir: runs/demo", "dir: runs/mine"))
    assert resolve_recipe_source("demo") == Path("demo")  # a file in the current directory wins over the name
    assert load_recipe("demo", [f"model.name_or_path={tmp_path}", "data.train=x/y:train", "data.eval=null"]
                       ).output.dir == "runs/mine"


def test_cp_refuses_to_overwrite_unless_forced(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    dest.write_text("my edits\n")
    with pytest.raises(MoetuneError, match="--force"):
        copy_recipe("demo", dest)
    assert main(["recipes", "cp", "demo", str(dest)]) == 1
    assert "--force" in capsys.readouterr().err
    assert dest.read_text() == "my edits\n"
    assert main(["recipes", "cp", "demo", str(dest), "--force"]) == 0
    assert dest.read_bytes() == (RECIPES_DIR / "demo.yaml").read_bytes()
    assert copy_recipe("accelerate/ddp", tmp_path / "new" / "ddp.yaml").read_text().startswith("# ")


def test_unknown_name_lists_close_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "mixtrl/8x7b_qlora_attention"]) == 2
    err = capsys.readouterr().err
    assert "recipe file not found" in err and "mixtral/8x7b_qlora_attention" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written
    with pytest.raises(RecipeError, match="close names: .*granitemoe"):
        resolve_recipe_source("granite/3.1_3b_a800m_lora")
    with pytest.raises(RecipeError, match="moetune recipes"):
        copy_recipe("no_such_recipe", tmp_path)
    with pytest.raises(RecipeError, match="Accelerate config, not a recipe"):
        resolve_recipe_source("accelerate/ddp")


def test_a_packaged_recipe_finds_its_own_data_from_anywhere(tmp_path, monkeypatch):
    """`pip install moetune` users run `moetune train demo` outside any repository: its shipped data is found."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny-mixtral").mkdir(parents=True)  # what `moetune tiny` would have written
    (tmp_path / "runs" / "tiny-mixtral" / "config.json").write_text("{}")
    recipe = load_recipe("demo")
    for source in (recipe.data.train, recipe.data.eval):
        assert Path(source).is_absolute() and Path(source).is_file()
    # A user's own recipe with the same relative path is not rewritten: it is an error naming the file.
    own = tmp_path / "own.yaml"
    own.write_text((Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml").read_text())
    with pytest.raises(RecipeError, match="recipes/data/demo_train.jsonl"):
        load_recipe(own)
