"""The recipe runner: `finetune(recipe)` = validate -> load -> adapters -> freeze -> data -> MoETrainer (router
controls, aux/z-loss, telemetry) -> train -> save. The CLI's `moetune train` and `accelerate launch -m moetune train` call it.

    moetune train recipes/demo.yaml --set train.max_steps=20
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m moetune train RECIPE   # 2 CPU ranks
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m moetune train RECIPE             # N GPUs

The output dir follows Hugging Face conventions: the adapter (PEFT layout) or full model and the tokenizer at its
root, `checkpoint-N/` from the trainer, `recipe.yaml` (resolved), `metrics.json`, `data_report.json` (rows read,
malformed, too long, per split), `trainer_state.json` and the routing report (routing.json/png). Only the main process writes.
"""

import json
import logging
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from moetune.config import Recipe, dump_recipe, load_recipe
from moetune.errors import MoetuneError, RecipeError
from moetune.launch_check import LaunchReport, check_launch
from moetune.resume_checks import asks_for_more, check_same_setup, stored_recipe
from moetune.run_dir import RunDir, write_atomic
from moetune.samples import format_samples, generate, sample_prompts


logger = logging.getLogger(__name__)


def finetune(
    recipe: "Recipe | dict | str | Path", *, overrides=(), resume: bool = False, overwrite: bool = False
) -> tuple[Path, dict]:
    """Run a recipe end to end.

    Everything that can be checked (the recipe, `train` as a real trl.SFTConfig, the model's config, the
    tokenizer and the data) is checked before the output dir is touched, so a mistake costs nothing.

    Args:
        recipe: a `Recipe`, a dict of sections or a YAML path.
        overrides: `key.path=value` strings applied on top (see `load_recipe`).
        resume: continue from the last complete `checkpoint-N` in `output.dir` (same data order, same loss
            trajectory). A finished run is left as it is unless the recipe asks for more steps or epochs.
        overwrite: delete a previous moetune run in `output.dir` first (only a dir moetune created).

    Returns:
        (output dir, final metrics as written to metrics.json).
    """
    recipe_file = None
    if isinstance(recipe, (str, Path)):
        from moetune.catalog import resolve_recipe_source

        recipe_file = resolve_recipe_source(recipe)  # a path, or a packaged recipe's name
    recipe = load_recipe(recipe, overrides)  # every recipe mistake surfaces here, before anything heavy
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU ranks, nccl on GPUs (docs/upstream.md#accelerate-cpu)
    run = RunDir(recipe.output.dir, recipe_file=recipe_file)
    run.check(resume=resume, overwrite=overwrite)
    if resume:
        stored = stored_recipe(run)
        check_same_setup(recipe, stored, run)
        finished = run.finished()
        if finished is not None and not asks_for_more(recipe, stored):
            _say(state, f"{run.path} already finished at step {finished.get('global_step')}; nothing to do. To train "
                        "longer, raise train.max_steps or train.num_train_epochs and --resume again.")
            return run.path, json.loads((run.path / "metrics.json").read_text(encoding="utf-8"))

    args = check_recipe(recipe, resume=resume)
    from moetune.data import load_datasets
    from moetune.loading import load_tokenizer

    data = load_datasets(recipe.data, load_tokenizer(recipe.model), max_rows=_rows_needed(args, state))
    _say(state, data.report.format_text())

    with _claimed(run, state, resume=resume, overwrite=overwrite) as skipped:
        for checkpoint, why in skipped:
            _say(state, f"--resume: skipped {checkpoint.name}: {why}")
        checkpoint, _ = run.last_complete_checkpoint() if resume else (None, [])
        if checkpoint is not None:
            _say(state, f"--resume: continuing from {checkpoint}")
        if state.is_main_process and not resume:
            write_atomic(run.path / "recipe.yaml", dump_recipe(recipe))
            run.set_status("running")
        trainer = build_trainer(recipe, args=args, data=data)
        from moetune.distributed import resolved_strategy

        # A silent fallback to another mode is an error, not a different run.
        check_launch(trainer.accelerator, strategy=resolved_strategy(recipe))
        # Once the trainer prepared (wrapped, sharded) the model: checked and said from its real parameters.
        trainer.add_callback(LaunchReport(trainer, say=lambda line: _say(state, line)))
        _say(state, trainer.freeze_report.format_table())
        if trainer.expert_selection is not None:
            _say(state, trainer.expert_selection.format_table())
        metrics = _train_and_save(trainer, recipe, run, state, checkpoint, data)
    _say(state, _summary(run.path, metrics), quiet_too=True)
    return run.path, metrics


def check_recipe(recipe: Recipe, *, resume: bool = False):
    """What `moetune validate` and `moetune train` both check beyond the schema; returns the trl.SFTConfig.

    `train` is built into a real trl.SFTConfig (TRL and transformers reject some values only there), and a local
    model's config.json is read (wrong types, missing keys). Loads no weights.
    """
    args = sft_config(recipe, has_eval=recipe.data.eval is not None, resume=resume)
    from moetune.loading import read_config
    from moetune.rules import is_local_model_path

    config = None
    if is_local_model_path(recipe.model.name_or_path):  # a Hub id is only read when training (no network here)
        config = read_config(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    if recipe.distributed.expert_parallel > 1:
        from accelerate import PartialState

        from moetune.expert_parallel import check_expert_parallel

        check_expert_parallel(recipe, PartialState().num_processes, config)  # before any weight is read
    return args


def build_trainer(recipe: "Recipe | dict | str | Path", *, args=None, data=None):
    """The `MoETrainer` a recipe describes, ready to `train()`: load -> adapters -> freeze -> data -> trainer.

    Writes nothing. The seam for custom loops and tests: `finetune` is this plus the run dir, training and saving.

    Args:
        recipe: a `Recipe`, a dict of sections or a YAML path.
        args: the trl.SFTConfig to use (default: `sft_config(recipe)`).
        data: already loaded `moetune.data.LoadedData` (default: load `recipe.data` with the model's tokenizer).

    Returns:
        The trainer, with `freeze_report` (trainable parameters per group) and `data_report` attached.
    """
    from transformers import set_seed

    from moetune.adapters import add_adapters
    from moetune.data import load_datasets
    from moetune.data_cache import progress_bars
    from moetune.esft import attach_expert_selection, esft_freeze, prepare_expert_selection
    from moetune.freezing import freeze, modules_trained_in_full
    from moetune.loading import load_model
    from moetune.trainer import MoETrainer

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    args = args if args is not None else sft_config(recipe, has_eval=recipe.data.eval is not None)
    set_seed(args.seed)  # the trainer seeds only after the adapters exist; LoRA's init must repeat too (--resume)
    from moetune.distributed import load_distributed_config

    model, tokenizer = load_model(recipe.model, recipe.quantization, router_fp32=recipe.moe.router_fp32,
                                  distributed_config=load_distributed_config(recipe))
    freeze_section = esft_freeze(recipe)  # `experts` (ESFT) without LoRA adds the routed experts
    if recipe.lora is not None:
        # Groups trained in full beside LoRA must travel in the adapter dir (PEFT's modules_to_save).
        model = add_adapters(model, recipe.lora, modules_to_save=modules_trained_in_full(model, freeze_section))
    report = freeze(model, freeze_section, lora_enabled=recipe.lora is not None)
    if report.trainable == 0:
        raise MoetuneError("nothing to train: `freeze` leaves every parameter frozen and there are no LoRA adapters; "
                           "set `freeze.train` (e.g. [non_experts]) or add a `lora` section")
    data = data if data is not None else load_datasets(recipe.data, tokenizer)
    selection = prepare_expert_selection(model, recipe, data.train, tokenizer)  # None without `experts`
    # MoETrainer installs the router controls (jitter, fp32 router, expert dropout) on the modules that train,
    # adds the aux/z losses and, with moe.telemetry, the RoutingTelemetry callback (routing.json/png).
    from moetune.cpu_fsdp import fsdp_on_cpu
    from moetune.distributed import keep_routers_fp32, needs_cpu_fsdp_shim

    shim = fsdp_on_cpu() if needs_cpu_fsdp_shim(recipe) else nullcontext()  # FSDP2 on CPU ranks (see cpu_fsdp.py)
    with progress_bars(False), shim:  # TRL's "Building labels / Truncating / Dropping" passes over data that is ready
        trainer = MoETrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                             processing_class=tokenizer, moe=recipe.moe)
    keep_routers_fp32(trainer, recipe)  # FSDP2 + bf16: routers as their own fp32 units (see distributed.py)
    # One compact line per logging step instead of the raw log dict (moetune/console.py, docs/metrics.md).
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from moetune.progress import StepPrinter

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StepPrinter(bar=not args.disable_tqdm))
    trainer.freeze_report, trainer.data_report = report, data.report
    attach_expert_selection(trainer, selection)  # trains only the selected experts (ExpertMask callback)
    return trainer


def _train_and_save(trainer, recipe: Recipe, run: RunDir, state, checkpoint: Path | None, data) -> dict[str, Any]:
    from moetune.esft import save_expert_selection

    model, tokenizer = trainer.model, trainer.processing_class
    prompts = sample_prompts(data.eval if data.eval is not None else data.train, recipe.output.sample_prompts)
    if prompts and state.is_main_process:
        _say(state, "Sample generations before training:\n" + format_samples(generate(model, tokenizer, prompts), tokenizer))

    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics: dict[str, Any] = {}
    if data.eval is not None:
        # From `eval_on_start` (see sft_config); on --resume it comes from the checkpoint's log history.
        history = trainer.state.log_history
        metrics["eval_loss_start"] = next((h["eval_loss"] for h in history if "eval_loss" in h and h["step"] == 0), None)
    metrics["train_loss"] = result.training_loss
    metrics["train_runtime_s"] = result.metrics.get("train_runtime")
    if data.eval is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    metrics["train_tokens"] = trainer.state.num_input_tokens_seen
    metrics.update({"aux_loss": None, "z_loss": None, **trainer.router_loss_means()})  # unweighted run means
    metrics["global_step"] = trainer.state.global_step

    trainer.check_weights_finite("final model")  # a diverged run is never saved as a finished model
    if trainer.expert_selection is not None and recipe.lora is None:
        # Full ESFT saves only what changed (the selected experts' slices and any group trained beside them), not
        # a second copy of the base; `moetune.esft.load_esft`, chat, generate and merge put it back on the base.
        if state.is_main_process:
            tokenizer.save_pretrained(str(run.path))
    else:
        from moetune.distributed import full_state_dict_for_save

        full_state_dict_for_save(trainer)  # FSDP: one consolidated model/adapter, whatever the checkpoints use
        trainer.save_model(str(run.path))  # adapter (PEFT layout) or full model + tokenizer; main process only
    save_expert_selection(trainer, run.path)  # ESFT: expert_selection.json (+ the selected slices when full)
    trainer.save_state()
    if state.is_main_process:
        _finish_run_dir(recipe, run, metrics, data, trainer.state.global_step)
    # A sharded model (FSDP, DeepSpeed) generates only with every rank taking part in its forwards.
    if prompts and (state.is_main_process or trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        _say(state, "Sample generations after training:\n" + format_samples(generate(model, tokenizer, prompts), tokenizer))
    if recipe.output.push_to_hub and state.is_main_process:
        from moetune.hub import push_run

        # The recipe check already made sure hub_repo_id is set; the token comes from HF_TOKEN or the saved login.
        _say(state, f"pushed to {push_run(run.path, recipe.output.hub_repo_id, private=recipe.output.private)}")
    state.wait_for_everyone()
    return metrics


def _finish_run_dir(recipe: Recipe, run: RunDir, metrics: dict, data, global_step: int) -> None:
    """After the trainer saved: a portable adapter, metrics, the resolved recipe, the model card, then `finished`."""
    from moetune.merging import serving_warning
    from moetune.model_card import write_model_card

    if recipe.lora is not None:
        from moetune.portable_adapters import make_adapter_portable

        # Loads with plain PEFT onto a full-precision base from anywhere (absolute base path, unquantized nesting).
        make_adapter_portable(run.path, recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    write_atomic(run.path / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_atomic(run.path / "data_report.json", json.dumps(data.report.to_dict(), indent=2) + "\n")
    write_atomic(run.path / "recipe.yaml", dump_recipe(recipe))  # on --resume: only once it succeeded
    write_model_card(run.path)  # replaces TRL's stock card
    warning = serving_warning(run.path)
    if warning:
        logger.warning(warning)
    run.set_status("finished", global_step=global_step)


@contextmanager
def _claimed(run: RunDir, state, *, resume: bool, overwrite: bool):
    """The main process claims (creates, locks, maybe empties) the run dir; every rank learns whether it could.

    Only the claim's own outcome is broadcast: an error later in the run is raised on every rank by itself, and a
    second broadcast from the main process alone would wait for ranks that never join it.
    """
    state.wait_for_everyone()  # every rank has checked before the main process changes anything
    if not state.is_main_process:
        refusal = _broadcast(state, None)
        if refusal:
            raise MoetuneError(f"the main process could not claim the output dir: {refusal}")
        yield []
        return
    with ExitStack() as stack:
        try:
            skipped = stack.enter_context(run.claim(resume=resume, overwrite=overwrite))
        except MoetuneError as err:
            _broadcast(state, str(err))
            raise
        _broadcast(state, "")
        yield skipped


def _broadcast(state, message: str | None) -> str | None:
    """Main: send `message` ("" = fine). Others: receive it. A no-op on one process."""
    if state.num_processes == 1:
        return message
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sft_config(recipe: Recipe, *, has_eval: bool, resume: bool = False):
    """The trl.SFTConfig of a recipe: moetune's sections, then moetune's defaults, then `recipe.train` on top.

    Defaults that differ from TRL's, and why:
      use_cpu            True without CUDA: TRL's default bf16=True raises on a CPU-only machine otherwise.
      bf16 / fp16        mixed precision only when `model.dtype` asks for it and the hardware has it (bf16 autocast
                         works on CPU); an fp32 recipe trains in fp32.
      activation_checkpointing  (gradient checkpointing) on with CUDA (TRL's default), off on CPU: it costs ~40%
                         speed there (docs/upstream.md#bf16-on-cpu) and CPU runs are tiny.
      report_to "none"   no tracker unless the recipe names one (TRL would pick up any installed one).
      completion_only_loss True  data.py only writes a `completion_mask` when `data.assistant_only_loss` asks for it.
      assistant_only_loss False  the `assistant_masks` column from data.py is applied by TRL as is.
      include_num_input_tokens_seen "non_padding"  train_tokens in metrics.json, kept across --resume.
      eval_on_start True with eval data (not on --resume): gives eval_loss_start. Not `trainer.evaluate()` before
                         `train()`: that marks the bare model as prepared by accelerate, so training never wraps it in
                         DistributedDataParallel and every rank trains on its own, silently (transformers 5.23 /
                         accelerate 1.15: `Accelerator.prepare_model` returns models with `_is_accelerate_prepared`
                         as they are; tests/test_multiprocess.py catches it).
      save_total_limit 2 checkpoints are full optimizer states; two are enough to resume.
    """
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "output_dir": recipe.output.dir,
        "max_length": recipe.data.max_length,
        "packing": recipe.data.packing,
        "completion_only_loss": True,
        "assistant_only_loss": False,
        "use_cpu": not cuda,
        "report_to": "none",
        "include_num_input_tokens_seen": "non_padding",
        "save_total_limit": 2,
    }
    if has_eval and not resume:
        kwargs["eval_on_start"] = True
    if recipe.data.packing:
        kwargs["padding_free"] = True  # packed rows must not attend to each other (docs/upstream.md#trl-packing)
    # Defaults that travel in pairs: one the recipe sets replaces moetune's whole pair.
    if not {"bf16", "fp16"} & recipe.train.keys():
        kwargs["bf16"] = recipe.model.dtype == "bfloat16" and (not cuda or torch.cuda.is_bf16_supported())
        kwargs["fp16"] = recipe.model.dtype == "float16" and cuda
    if not {"gradient_checkpointing", "activation_checkpointing"} & recipe.train.keys():
        kwargs["activation_checkpointing"] = cuda
    from moetune.distributed import trainer_arguments

    # fsdp / deepspeed for a non-auto `distributed.strategy`; expert parallelism's checkpoint settings
    kwargs.update(trainer_arguments(recipe, resume=resume))
    kwargs.update(recipe.train)
    try:
        return SFTConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"`train` is not a valid trl.SFTConfig: {err}") from None


# ------------------------------------------------------------------------------------------------- reporting


def _say(state, message: str, *, quiet_too: bool = False) -> None:
    from moetune.console import is_quiet

    if state.is_main_process and message and (quiet_too or not is_quiet()):
        print(message, flush=True)  # noqa: T201 -- progress of a long command, next to the trainer's own bar


def _summary(out: Path, metrics: dict) -> str:
    parts = [f"{k}={metrics[k]:.4f}" for k in ("eval_loss_start", "eval_loss", "train_loss", "aux_loss", "z_loss")
             if metrics.get(k) is not None]
    if metrics.get("train_runtime_s") is not None:
        parts.append(f"{metrics.get('global_step')} steps in {metrics['train_runtime_s']:.1f} s")
    return f"Done: {out} ({', '.join(parts)}); metrics in {out / 'metrics.json'}"


def _rows_needed(args, state) -> int | None:
    """Train rows a run with `max_steps` consumes (one global batch per step), for `load_datasets(max_rows=)`.
    None (all rows) without max_steps, and with packing, where a sequence holds an unknown number of rows."""
    if args.max_steps is None or args.max_steps <= 0 or args.packing:
        return None
    return args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * state.num_processes
