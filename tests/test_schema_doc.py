"""The docs stay true: docs/recipe.md is what the schema generates, and the README names only real commands."""

import json
import re
from pathlib import Path
from typing import get_args

from moetune.cli import build_parser, main
from moetune.config import DataSection, Recipe
from moetune.rules import GROUPS, LORA_GROUPS, PRESETS
from moetune.schema_doc import GROUP_NOTES, REGENERATE, recipe_json_schema, render_reference


REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "docs" / "recipe.md"


def _sections(text: str) -> dict[str, str]:
    """`## name` heading -> the text under it."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_reference_is_up_to_date():
    assert REFERENCE.read_text(encoding="utf-8") == render_reference(), f"docs/recipe.md is stale: run `{REGENERATE}`"


def test_every_schema_field_is_in_its_section():
    schema = Recipe.model_json_schema()
    sections = _sections(render_reference())
    for name, prop in schema["properties"].items():
        assert name in sections, f"section {name} missing"
        ref = prop.get("$ref") or next((p["$ref"] for p in prop.get("anyOf", []) if "$ref" in p), None)
        if ref is None:
            continue  # `train`: a free-form mapping
        section = schema["$defs"][ref.rsplit("/", 1)[1]]
        for key, field in section["properties"].items():
            row = next((line for line in sections[name].splitlines() if line.startswith(f"| `{key}` |")), None)
            assert row is not None, f"{name}.{key} missing"
            assert " ".join(field["description"].split()) in row.replace("\\|", "|")
            if "default" in field:
                assert f"`{json.dumps(field['default']) if not isinstance(field['default'], str) else field['default']}`" in row


def test_defaults_from_factories_and_required_keys_are_shown():
    sections = _sections(render_reference())
    assert '| `targets` | list of string (at least 1) | `["attention"]` |' in sections["lora"]
    assert "| `name_or_path` | string | **required** |" in sections["model"]
    assert "| `r` | integer > 0 | `16` |" in sections["lora"]


def test_formats_groups_and_presets_are_documented():
    sections = _sections(render_reference())
    for fmt in get_args(DataSection.model_fields["format"].annotation):
        assert f"| `{fmt}` |" in sections["Data formats"]
        assert "(not described yet)" not in sections["Data formats"]
    assert "sharegpt" in sections["Data formats"].lower()
    assert set(GROUP_NOTES) == set(GROUPS)
    for group in GROUPS:
        assert f"| `{group}` | {GROUP_NOTES[group]} |" in sections["Parameter groups"]
    for preset, groups in PRESETS.items():
        assert f"| `{preset}` | {', '.join(groups)} |" in sections["Freeze presets (`freeze.train`)"]
    for group in LORA_GROUPS:
        assert f"`{group}`" in sections["LoRA target groups (`lora.targets`)"]


def test_schema_command_prints_the_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == json.loads(json.dumps(recipe_json_schema()))
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert set(schema["properties"]) == set(Recipe.model_fields)
    assert schema["$defs"]["LoraSection"]["additionalProperties"] is False  # editors flag unknown keys too


def test_readme_names_only_commands_that_exist():
    commands = build_parser()._subparsers._group_actions[0].choices
    text = (REPO / "README.md").read_text(encoding="utf-8")
    code = "\n".join(re.findall(r"```\w*\n(.*?)```", text, flags=re.DOTALL) + re.findall(r"`([^`\n]+)`", text))
    used = set(re.findall(r"\bmoetune ([a-z][\w-]*)", code))
    assert {"train", "validate", "tiny", "recipes", "env", "schema"} <= used
    assert used <= set(commands), f"README names unknown commands: {sorted(used - set(commands))}"
    for sub in re.findall(r"\bmoetune recipes ([a-z]\w*)", code):
        assert sub == "cp"


def test_readme_python_snippet_runs_after_the_quick_start(monkeypatch, tmp_path):
    """The snippet, with the heavy calls replaced by what they check first: its recipe and overrides validate, and
    it does not write into the quick start's `runs/demo` (which would refuse: the dir is taken)."""
    import moetune
    from moetune.config import load_recipe

    text = (REPO / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r"## Python.*?```python\n(.*?)```", text, flags=re.DOTALL).group(1)
    model_dir = f"model.name_or_path={tmp_path}"  # stands in for runs/tiny-mixtral, which the quick start writes
    runs = []

    def finetune(recipe, *, overrides=(), resume=False, overwrite=False):
        runs.append((load_recipe(recipe, [*overrides, model_dir]), overwrite))
        return Path(runs[-1][0].output.dir), {}

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(moetune, "finetune", finetune, raising=False)
    monkeypatch.setattr(moetune, "build_trainer", lambda recipe: load_recipe(recipe, [model_dir]), raising=False)
    monkeypatch.setattr(moetune, "load_model", lambda path: (Path(path), None), raising=False)
    for name in ("describe_moe", "group_parameters"):
        monkeypatch.setattr(moetune, name, lambda model: None, raising=False)
    exec(compile(snippet, "README.md", "exec"), {})
    (recipe, overwrite), = runs
    assert recipe.output.dir != load_recipe("demo", [model_dir]).output.dir or overwrite
    assert "moetune tiny mixtral runs/tiny-mixtral" in text and '"runs/tiny-mixtral"' in snippet
