"""The recipes and Accelerate configs shipped inside the package, found by name.

    moetune recipes                                  # the table: name, model, method, memory, GPUs
    moetune recipes cp mixtral/8x7b_qlora_attention my_recipe.yaml
    moetune train mixtral/8x7b_qlora_attention       # a packaged recipe's name works wherever a path does

A recipe's name is its path under `moetune/recipes/` without `.yaml` (`demo`, `qwen3_moe/30b_a3b_qlora_experts`);
Accelerate configs are `accelerate/<name>`. Each recipe's header carries one uniform line that the table reads:
`# memory: <what the weights and state take>, GPUs: <what to plan for>`. Torch-free, like `config.py`.
"""

import difflib
import re
import shutil
from pathlib import Path

import yaml

from moetune.errors import MoetuneError, RecipeError


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
ACCELERATE_DIR = RECIPES_DIR / "accelerate"
_HARDWARE = re.compile(r"^# memory: (?P<memory>.+?), GPUs: (?P<gpus>.+?)(?:\s{2,}\(.*)?\s*$", re.MULTILINE)


def recipe_names() -> list[str]:
    """Names of the packaged training recipes (not the Accelerate configs), sorted."""
    return sorted(_name(p) for p in RECIPES_DIR.rglob("*.yaml") if p.parent != ACCELERATE_DIR)


def accelerate_names() -> list[str]:
    """Names of the packaged Accelerate configs (`accelerate/ddp`, ...), sorted."""
    return sorted(_name(p) for p in ACCELERATE_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The file of a packaged recipe or Accelerate config; `name` may carry `.yaml` or a leading `recipes/`."""
    stem = name.removeprefix("recipes/").removesuffix(".yaml")
    if stem in recipe_names() + accelerate_names():
        return RECIPES_DIR / f"{stem}.yaml"
    known = recipe_names() + accelerate_names()
    close = difflib.get_close_matches(stem, known, n=3, cutoff=0.4) or [n for n in known if stem in n][:3]
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise RecipeError(f"no packaged recipe named {name!r}{hint} (`moetune recipes` lists them all)")


def resolve_recipe_source(text: "str | Path") -> Path:
    """What `moetune train/validate TEXT` and `load_recipe(TEXT)` read: an existing path wins, else a packaged name.

    Raises RecipeError when neither exists, naming the close packaged names.
    """
    path = Path(text).expanduser()
    if path.exists():
        return path
    try:
        found = recipe_path(str(text))
    except RecipeError as err:
        raise RecipeError(f"recipe file not found: {str(text)!r}, and {err}") from None
    if found.parent == ACCELERATE_DIR:
        raise RecipeError(f"{text!r} is an Accelerate config, not a recipe: pass it to "
                          f"`accelerate launch --config_file {found} -m moetune train RECIPE`")
    return found


def locate_packaged_data(raw: dict, recipe_file: Path) -> None:
    """Make a packaged recipe's own data files (`recipes/data/...`) findable from any working directory.

    Shipped recipes name their data relative to the repository root, as users run them there. From elsewhere (a
    `pip install`), a relative data path that does not exist here but does inside the package becomes absolute.
    Paths that exist relative to the working directory, and every path of a user's own recipe, are left alone.
    """
    if RECIPES_DIR.resolve() not in recipe_file.resolve().parents:
        return
    data = raw.get("data")
    for split in ("train", "eval"):
        value = data.get(split) if isinstance(data, dict) else None
        if not isinstance(value, str) or Path(value).is_absolute() or Path(value).expanduser().exists():
            continue
        shipped = RECIPES_DIR.parent / value
        if shipped.is_file():
            data[split] = str(shipped)


def recipe_summary(name: str) -> dict[str, str]:
    """One row of `moetune recipes`: name, model, method, memory, GPUs, description (the header's first line)."""
    path = recipe_path(name)
    text = path.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    hardware = _HARDWARE.search(text)
    return {
        "name": name,
        "model": raw["model"]["name_or_path"],
        "method": _method(raw),
        "memory": hardware["memory"] if hardware else "?",
        "gpus": hardware["gpus"] if hardware else "?",
        "description": text.splitlines()[0].removeprefix("# ").strip(),
        "path": str(path),
    }


def _method(raw: dict) -> str:
    """QLoRA / LoRA (and their targets) or full / selective fine-tuning, read from the recipe's sections."""
    lora, trained = raw.get("lora"), (raw.get("freeze") or {}).get("train")
    if lora is not None:
        method = "QLoRA" if raw.get("quantization") is not None else "LoRA"
        method += f" {'+'.join((lora or {}).get('targets', ['attention']))}"
        return method + (f", full {'+'.join(trained)}" if trained else "")
    return f"full {'+'.join(trained)}" if trained else "full"


def format_table() -> str:
    """The `moetune recipes` listing: recipes as a table, then the Accelerate configs with their paths."""
    columns = ("name", "model", "method", "memory", "gpus")
    rows = [recipe_summary(n) for n in recipe_names()]
    heads = {"name": "NAME", "model": "MODEL", "method": "METHOD", "memory": "MEMORY", "gpus": "GPUS"}
    widths = {c: max(len(heads[c]), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(heads[c].ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    lines += ["", "Accelerate configs (accelerate launch --config_file PATH -m moetune train RECIPE):"]
    width = max(len(n) for n in accelerate_names())
    lines += [f"  {n.ljust(width)}  {RECIPES_DIR / n}.yaml" for n in accelerate_names()]
    lines += ["", "moetune train NAME runs one; moetune recipes cp NAME DEST copies one to edit."]
    return "\n".join(lines)


def copy_recipe(name: str, dest: "str | Path", *, force: bool = False) -> Path:
    """Copy a packaged recipe or Accelerate config, header included, to `dest` (a file, or a directory to put it in).

    Refuses to replace an existing file unless `force`. Returns the written path.
    """
    source = recipe_path(name)
    dest = Path(dest).expanduser()
    if dest.is_dir() or str(dest).endswith(("/", "\\")):
        dest = dest / source.name
    if dest.is_dir():
        raise MoetuneError(f"{dest} is a directory; name a file or a directory to copy into")
    if dest.exists() and not force:
        raise MoetuneError(f"{dest} exists; pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    return dest


def _name(path: Path) -> str:
    return path.relative_to(RECIPES_DIR).with_suffix("").as_posix()
