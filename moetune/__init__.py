"""moetune: fine-tuning for sparse Mixture-of-Experts language models.

    import moetune
    output_dir, metrics = moetune.finetune("recipes/demo.yaml")

or piece by piece: `load_model` -> `add_adapters` -> `freeze` -> `apply_router_controls` -> `MoETrainer`; then
`load_for_inference`, `merge_run` and `push_run` to use and share what was trained.
Submodules are imported on first use, so `import moetune` (and the CLI) stays fast.
"""

import importlib


__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "MoetuneError": "errors",
    "RecipeError": "errors",
    "Recipe": "config",
    "load_recipe": "config",
    "describe_moe": "architectures",
    "find_moe_layers": "architectures",
    "moe_layout": "architectures",
    "classify_parameters": "architectures",
    "group_parameters": "architectures",
    "inspect_model": "sizing",
    "make_tiny": "tiny",
    "load_model": "loading",
    "add_adapters": "adapters",
    "load_adapter": "adapters",
    "make_adapter_portable": "portable_adapters",
    "freeze": "freezing",
    "apply_router_controls": "router_controls",
    "MoETrainer": "trainer",
    "RoutingTelemetry": "telemetry",
    "load_datasets": "data",
    "finetune": "training",
    "build_trainer": "training",
    "check_recipe": "training",
    "TrainingDiverged": "errors",
    "load_for_inference": "inference",
    "merge_run": "merging",
    "serving_warning": "merging",
    "write_model_card": "model_card",
    "push_run": "hub",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"moetune.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'moetune' has no attribute {name!r}")
