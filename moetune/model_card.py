"""The model card (README.md) of a run dir, built from what the run dir holds.

Metadata goes through `huggingface_hub.ModelCardData`, the text through `ModelCard.from_template`. Everything but
the weights' config is optional: a section whose source file is missing (metrics.json, routing.json, recipe.yaml,
a base model that cannot be read from here) is left out.
"""

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from moetune.errors import MoetuneError
from moetune.rules import is_local_model_path
from moetune.run_info import TrainedRun, read_run_dir


CARD_FILE = "README.md"

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}
{% if method %}
## Method

{% for line in method %}- {{ line }}
{% endfor %}{% endif %}{% if params %}
## Trainable parameters

| group | LoRA | trained in full |
|---|---:|---:|
{% for group, lora, full in params %}| {{ group }} | {{ lora }} | {{ full }} |
{% endfor %}{% endif %}{% if data %}
## Training data

{% for line in data %}- {{ line }}
{% endfor %}{% endif %}{% if metrics %}
## Metrics

| metric | value |
|---|---:|
{% for name, value in metrics %}| {{ name }} | {{ value }} |
{% endfor %}{% endif %}{% if routing %}
## Routing

{% if routing_png %}![Share of routed slots per expert and MoE layer](routing.png)

{% endif %}{{ routing }}
{% endif %}
## Use it

```python
{{ snippet }}
```
{% if quantized %}
The adapter was trained against the 4-bit base; `moetune chat` and `moetune generate` load it that way, and
`moetune merge` folds it into the dequantized base.
{% endif %}{% if serving %}
**Serving.** {{ serving }}
{% endif %}
Trained with moetune{% if has_recipe %}; the resolved recipe is in `recipe.yaml`{% endif %}.
"""

_GENERATE = """
tokenizer = AutoTokenizer.from_pretrained("{ref}")
messages = [{{"role": "user", "content": "Hello!"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""

ADAPTER_SNIPPET = """import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{ref}", dtype=torch.bfloat16)  # loads the base, then the adapter""" + _GENERATE

MODEL_SNIPPET = """import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{ref}", dtype=torch.bfloat16)""" + _GENERATE

EXPERT_DELTA_SNIPPET = """import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from moetune.esft import load_esft  # this run holds only the trained experts' slices; they go onto the base

model = load_esft(AutoModelForCausalLM.from_pretrained("{base}", dtype=torch.bfloat16), "{ref}")""" + _GENERATE


def write_model_card(run_dir: str | Path, repo_id: str | None = None) -> Path:
    """Write `README.md` into a run dir (adapter, full or merged model), replacing any previous one.

    Args:
        run_dir: a run's output directory, after the model and tokenizer were saved.
        repo_id: the Hub repo the card's code snippet loads from; default the recipe's `output.hub_repo_id` when
            it pushes, else the run dir's absolute path.

    Returns:
        The card's path.
    """
    card = build_model_card(run_dir, repo_id)
    path = Path(run_dir) / CARD_FILE
    card.save(path)
    return path


def build_model_card(run_dir: str | Path, repo_id: str | None = None) -> ModelCard:
    """The card `write_model_card` writes, without writing it (`moetune push` uploads it with the repo's id)."""
    run = read_run_dir(run_dir)
    recipe = run.recipe
    merge = _read_json(run.path / "merge_report.json")
    ref = repo_id or (recipe.output.hub_repo_id if recipe and recipe.output.push_to_hub else None) or str(run.path.resolve())
    base = run.base if run.on_base or recipe is not None else None
    model_type = _model_type(run, base)
    card_data = ModelCardData(
        base_model=base if base and not is_local_model_path(base) else None,
        library_name="peft" if run.is_adapter else "transformers",
        tags=[t for t in ("moe", "moetune", model_type, "lora" if run.is_adapter else None,
                          "merge" if merge else None) if t],
        datasets=_hub_datasets(recipe) or None,
        license=_license(base) if base else None,
        pipeline_tag="text-generation",
    )
    routing = _read_json(run.path / "routing.json")
    from moetune.merging import serving_warning

    return ModelCard.from_template(
        card_data, template_str=TEMPLATE,
        title=repo_id or run.path.resolve().name,
        summary=_summary(run, base, merge),
        method=_method(run, merge),
        params=_params_table(run),
        data=_data_lines(run),
        metrics=[(k, _number(v)) for k, v in (_read_json(run.path / "metrics.json") or {}).items() if v is not None],
        routing=_routing_summary(routing) if routing else None,
        routing_png=(run.path / "routing.png").is_file(),
        snippet=(EXPERT_DELTA_SNIPPET.format(base=base, ref=ref) if run.is_expert_delta
                 else (ADAPTER_SNIPPET if run.is_adapter else MODEL_SNIPPET).format(ref=ref)),
        quantized=run.quantization is not None,
        serving=serving_warning(run.path),
        has_recipe=recipe is not None,
    )


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a broken optional record only costs its section


def _model_type(run: TrainedRun, base: str | None) -> str | None:
    if run.model_config is not None:
        return run.model_config.get("model_type")
    try:
        from moetune.loading import read_config

        return read_config(base).model_type if base else None
    except (MoetuneError, OSError):
        return None


def _license(base: str) -> str | None:
    """The base model's license from its own card: a local README.md or one already in the Hub cache (no download)."""
    from huggingface_hub import try_to_load_from_cache

    local = Path(base).expanduser() / CARD_FILE
    card_file = str(local) if local.is_file() else (try_to_load_from_cache(base, CARD_FILE) if not is_local_model_path(base) else None)
    if not isinstance(card_file, str):
        return None
    try:
        return ModelCard.load(card_file).data.license
    except (ValueError, OSError):
        return None


def _hub_datasets(recipe) -> list[str]:
    from moetune.rules import DATA_SUFFIXES

    out = []
    for source in (recipe.data.train, recipe.data.eval) if recipe else ():
        if source and Path(source).suffix.lower() not in DATA_SUFFIXES and not Path(source).expanduser().exists() \
                and not source.startswith((".", "/", "~")):
            out.append(source.split(":", 1)[0])  # `owner/name:split` -> the dataset id
    return sorted(set(out))


def _summary(run: TrainedRun, base: str | None, merge: dict | None) -> str:
    base_text = f"`{base}`" if base else "its base model"
    if run.is_adapter:
        return f"A LoRA adapter for {base_text}, fine-tuned with moetune."
    if merge:
        return (f"{base_text} with a moetune LoRA adapter merged into its weights ({merge['dtype']}): a plain "
                "transformers checkpoint.")
    return f"{base_text}, fine-tuned with moetune."


def _method(run: TrainedRun, merge: dict | None) -> list[str]:
    recipe = run.recipe
    lines = []
    if recipe is not None:
        q = recipe.quantization
        lines.append(f"Quantization: 4-bit {q.quant_type} base (double quantization {'on' if q.double_quant else 'off'}; "
                     "attention, shared-expert and routed-expert weights in 4-bit, router in full precision), "
                     f"compute in {recipe.model.dtype}" if q else f"Quantization: none ({recipe.model.dtype})")
        if recipe.lora is not None:
            lora = recipe.lora
            lines.append(f"LoRA: r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, targets: "
                         f"{', '.join(lora.targets)}")
        freeze = recipe.freeze
        train = freeze.train if freeze.train is not None else (["nothing (adapters only)"] if recipe.lora else ["all"])
        extra = "".join(f"; {key} {getattr(freeze, key)}" for key in ("include", "exclude") if getattr(freeze, key))
        lines.append(f"Trained in full: {', '.join(train)}{extra}")
        moe = recipe.moe
        aux = (f"on (coefficient {moe.aux_loss_coef:g})" if moe.aux_loss_coef is not None else "on (the model's coefficient)") \
            if moe.aux_loss else "off"
        lines.append(f"Router: load-balancing loss {aux}, z-loss {moe.z_loss_coef:g}, jitter {moe.router_jitter:g}, "
                     f"{'fp32' if moe.router_fp32 else 'model-dtype'} router")
        lines.append(f"Expert dropout: {moe.expert_dropout:g}")
    if merge:
        lines.append(f"Merged with `moetune merge` in {merge['dtype']}; logits checked against base + adapter on "
                     f"{merge['tokens']} tokens of {merge['sample_source']}: median relative error "
                     f"{merge['median_rel_error']:.2g} (tolerance {merge['tolerance']:.2g}), max "
                     f"{merge['max_rel_error']:.2g}")
    return lines


def _params_table(run: TrainedRun) -> list[tuple[str, str, str]]:
    try:
        if run.is_adapter:
            from moetune.portable_adapters import adapter_parameter_counts

            counts = adapter_parameter_counts(run.path, run.base)
        elif run.recipe is not None and run.recipe.lora is None:
            from moetune.freezing import freeze
            from moetune.loading import empty_model

            report = freeze(empty_model(str(run.path)), run.recipe.freeze, lora_enabled=False)
            counts = {group: {"full": n} for group, n in report.trainable_by_group.items() if n}
        else:
            return []  # a merged model: the adapter it came from is not here
    except MoetuneError:
        return []
    rows = [(group, f"{c.get('lora', 0):,}", f"{c.get('full', 0):,}") for group, c in sorted(counts.items())]
    total_lora = sum(c.get("lora", 0) for c in counts.values())
    total_full = sum(c.get("full", 0) for c in counts.values())
    return rows + [("**total**", f"{total_lora:,}", f"{total_full:,}")] if rows else []


def _data_lines(run: TrainedRun) -> list[str]:
    if run.recipe is None:
        return []
    data = run.recipe.data
    report = _read_json(run.path / "data_report.json") or {}
    lines = []
    for split, source in (("train", data.train), ("eval", data.eval)):
        if source:
            kept = report.get(split, {})
            counts = f": {kept['kept']} rows, {kept['tokens']} tokens" if "kept" in kept and "tokens" in kept else ""
            lines.append(f"{split}: `{source}`{counts}")
    lines.append(f"format {data.format}, max length {data.max_length}, packing {'on' if data.packing else 'off'}, "
                 f"loss on {'answers only' if data.assistant_only_loss else 'every token'}")
    return lines


def _routing_summary(report: dict) -> str:
    layers = report.get("layers") or []
    if not layers:
        return "No routing statistics were recorded."
    worst = max(layers, key=lambda layer: layer.get("max_over_mean", 0.0))
    dead = {layer["layer"]: layer["dead_experts"] for layer in layers if layer.get("dead_experts")}
    text = (f"Over {report.get('tokens', 0):,} training tokens the most imbalanced MoE layer is layer {worst['layer']}: "
            f"its busiest expert took {max(worst['share']):.1%} of the routed slots ({worst['max_over_mean']:.2f}x an "
            f"even share, CV {worst['cv']:.2f}). Dead experts: "
            + ("; ".join(f"layer {k}: {v}" for k, v in dead.items()) if dead else "none") + ".")
    warnings = report.get("warnings") or []
    return text + "".join(f"\n\n> {w}" for w in warnings)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
