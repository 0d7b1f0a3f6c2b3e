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


def test_readme_python_snippet_runs_after_the_quick_start(tmp_path, monkeypatch):
    """The README's Python snippet, run for real in the quick start's state: the demo model, `runs/demo` taken."""
    from moetune.tiny import make_tiny

    (tmp_path / "recipes").symlink_to(REPO / "moetune" / "recipes")
    make_tiny("mixtral", tmp_path / "runs" / "tiny-mixtral", hidden_size=128)
    (tmp_path / "runs" / "demo").mkdir()
    (tmp_path / "runs" / "demo" / "metrics.json").write_text("{}")  # the quick start's finished run
    monkeypatch.chdir(tmp_path)
    text = (REPO / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r"## Python.*?```python\n(.*?)```", text, flags=re.DOTALL).group(1)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["metrics"]["global_step"] > 0 and (scope["output_dir"] / "metrics.json").is_file()
    assert type(scope["trainer"]).__name__ == "MoETrainer"
    assert scope["model"].config.model_type == "mixtral"
    assert (tmp_path / "runs" / "demo" / "metrics.json").read_text() == "{}"  # the quick start's run untouched
