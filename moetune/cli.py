"""The `moetune` command line. Each subcommand is a few lines over a library function, so the CLI and the Python
API cannot drift apart. User mistakes (`MoetuneError`) print one line and exit non-zero; bugs keep their traceback.

    moetune inspect MODEL [--json] [--quantize 4bit]
    moetune tiny ARCH OUT_DIR [--hidden-size N] [--layers N] [--experts N] [--seed N]
    moetune validate RECIPE [--set key.path=value ...]
    moetune train RECIPE [--set key.path=value ...] [--resume | --overwrite] [-q | -v]
    moetune data RECIPE [--show N] [--set key.path=value ...]
    moetune routing MODEL DATA [--max-examples N] [--max-length N] [--out DIR] [--json]
    moetune recipes [cp NAME DEST [--force]]
    moetune schema
    moetune env [--json]
    moetune --version
    moetune chat RUN_DIR_OR_MODEL [--max-new-tokens N] [--temperature T --top-p P --seed S]
    moetune generate RUN_DIR_OR_MODEL (--prompt TEXT | --file PROMPTS.jsonl) [--out OUT.jsonl] [...]
    moetune merge RUN_DIR OUT_DIR [--dtype bfloat16|float32|float16]
    moetune push RUN_DIR REPO_ID [--private] [--revision R] [--merged]
    moetune prune MODEL DATA OUT --keep N|FRACTION [--score reap|tokens|gate] [--max-tokens N] [--json]
"""

import argparse
import json
import logging
import os
import sys

from moetune.errors import MoetuneError


def _inspect(args: argparse.Namespace) -> None:
    from moetune.sizing import format_report, inspect_model

    report = inspect_model(args.model, quantize=args.quantize, trust_remote_code=args.trust_remote_code)
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def _tiny(args: argparse.Namespace) -> None:
    from moetune.tiny import make_tiny

    overrides = {key: value for key, value in (
        ("hidden_size", args.hidden_size), ("num_hidden_layers", args.layers),
    ) if value is not None}
    if args.experts is not None:
        overrides.update(_experts_override(args.arch, args.experts))
    out = make_tiny(args.arch, args.out_dir, seed=args.seed, **overrides)
    print(f"wrote a tiny {args.arch} model and tokenizer to {out}")


def _experts_override(arch: str, count: int) -> dict:
    from moetune.tiny import tiny_config

    config = tiny_config(arch)
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        if key in config.to_dict():
            return {key: count}
    raise MoetuneError(f"--experts is not supported for {arch}")


def _validate(args: argparse.Namespace) -> None:
    from moetune.config import load_recipe, recipe_warnings

    recipe = load_recipe(args.recipe, args.overrides, log_warnings=False)  # printed here instead, as `warning:` lines
    for warning in recipe_warnings(recipe):
        print(f"warning: {warning}", file=sys.stderr)
    if not args.schema_only:
        from moetune.training import check_recipe

        check_recipe(recipe)  # exactly what `moetune train` checks before it touches anything
    print(f"{args.recipe}: OK (model {recipe.model.name_or_path}, output {recipe.output.dir})")


def _train(args: argparse.Namespace) -> None:
    from moetune.training import finetune

    _, metrics = finetune(args.recipe, overrides=args.overrides, resume=args.resume, overwrite=args.overwrite)
    if args.verbose:  # finetune printed the one-line summary; the whole metrics.json only on request
        print(json.dumps(metrics, indent=2))


def _data(args: argparse.Namespace) -> None:
    from moetune.data_show import describe_data

    print(describe_data(args.recipe, overrides=args.overrides, show=args.show, color=sys.stdout.isatty()))


def _add_data_parser(commands) -> None:
    p = commands.add_parser("data", help="the data report and tokenized samples with the loss mask (no model weights)")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--show", type=int, default=3, metavar="N", help="print N tokenized train samples (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set data.max_length=512 (repeatable)")
    _add_verbosity(p)
    p.set_defaults(run=_data)


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    """-v / -q after the subcommand too (`moetune train RECIPE -q`); SUPPRESS keeps a value given before it."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging, raw third-party output, tracebacks for every error")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="warnings, errors and the final summary only")


def _routing(args: argparse.Namespace) -> None:
    from moetune.routing_report import format_routing_report, write_routing_report
    from moetune.telemetry import routing_from_paths

    report = routing_from_paths(args.model, args.data, max_examples=args.max_examples, max_length=args.max_length,
                                batch_size=args.batch_size)
    if args.out:
        json_path, png_path = write_routing_report(report, args.out)
        print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else format_routing_report(report))


def _recipes(args: argparse.Namespace) -> None:
    from moetune.catalog import copy_recipe, format_table

    if args.action == "cp":
        dest = copy_recipe(args.name, args.dest, force=args.force)
        print(f"copied {args.name} to {dest}")
    else:
        print(format_table())


def _schema(args: argparse.Namespace) -> None:
    from moetune.schema_doc import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))


def _env(args: argparse.Namespace) -> None:
    from moetune.env import collect_env, format_env

    report = collect_env()
    print(json.dumps(report, indent=2) if args.json else format_env(report))


def _add_tool_commands(parser: argparse.ArgumentParser, commands) -> None:
    """--version, and the commands around training: recipes, schema, env."""
    from moetune import __version__

    parser.add_argument("--version", action="version", version=f"moetune {__version__}")

    p = commands.add_parser("recipes", help="list the packaged recipes and Accelerate configs, or copy one")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    cp = actions.add_parser("cp", help="copy a packaged recipe (or accelerate/NAME config) to edit it")
    cp.add_argument("name", help="recipe name as `moetune recipes` lists it, e.g. mixtral/8x7b_qlora_attention")
    cp.add_argument("dest", help="file to write, or an existing directory to copy into")
    cp.add_argument("--force", action="store_true", help="replace DEST if it exists")
    p.set_defaults(run=_recipes)

    p = commands.add_parser("schema", help="print the recipe JSON schema (for editors: yaml-language-server)")
    p.set_defaults(run=_schema)

    p = commands.add_parser("env", help="versions, devices and platform, to paste into a bug report")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_env)
def _settings(args: argparse.Namespace):
    from moetune.inference import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)


def _chat(args: argparse.Namespace) -> None:
    from moetune.inference import chat_session, load_for_inference

    settings = _settings(args)  # bad values fail before the model loads
    model, tokenizer = load_for_inference(args.model)
    chat_session(model, tokenizer, settings)


def _generate(args: argparse.Namespace) -> None:
    from moetune.inference import complete_rows, load_for_inference, read_prompts, write_jsonl

    settings = _settings(args)
    rows = read_prompts(args.file) if args.file else [({}, args.prompt)]
    model, tokenizer = load_for_inference(args.model)
    results = complete_rows(model, tokenizer, rows, settings, raw=args.raw, batch_size=args.batch_size)
    if args.out:
        print(f"wrote {len(results)} completion(s) to {write_jsonl(results, args.out)}", file=sys.stderr)
    elif args.prompt is not None:
        print(results[0]["completion"])
    else:
        for result in results:
            print(json.dumps(result, ensure_ascii=False))


def _merge(args: argparse.Namespace) -> None:
    from moetune.merging import merge_run

    report = merge_run(args.run_dir, args.out_dir, args.dtype)
    print(report.format_text())
    print(f"wrote {args.out_dir}")


def _push(args: argparse.Namespace) -> None:
    from moetune.hub import push_run

    url = push_run(args.run_dir, args.repo_id, private=args.private, revision=args.revision, merged=args.merged,
                   merge_dtype=args.dtype)
    print(f"pushed {args.run_dir} to {args.repo_id}: {url}")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a moetune run dir, a merged model dir, any model dir, or a Hub id")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily; > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature > 0)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
def _prune(args: argparse.Namespace) -> None:
    from moetune.pruning import format_prune_report, prune

    report = prune(args.model, args.data, args.out, keep=args.keep, score=args.score, max_tokens=args.max_tokens,
                   max_length=args.max_length, batch_size=args.batch_size)
    print(json.dumps(report, indent=2) if args.json else format_prune_report(report))


def _add_prune_parser(commands) -> None:
    p = commands.add_parser("prune", help="remove the lowest-scoring experts of every MoE layer (REAP, tokens, gate)")
    p.add_argument("model", help="local model directory")
    p.add_argument("data", help="calibration data file (.jsonl/.json/.csv/.parquet) in any moetune data format")
    p.add_argument("out", help="directory for the pruned checkpoint (loads with AutoModelForCausalLM)")
    p.add_argument("--keep", type=float, required=True, metavar="N|FRACTION",
                   help="experts kept per MoE layer: a count (6) or a fraction (0.75)")
    p.add_argument("--score", choices=["reap", "tokens", "gate"], default="reap",
                   help="what ranks the experts: REAP saliency (default), token share or gate mass")
    p.add_argument("--max-tokens", type=int, default=20000, help="calibration tokens")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_prune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetune", description="Fine-tune sparse Mixture-of-Experts language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, raw third-party output, and tracebacks for every error")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings, errors and the final summary only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("inspect", help="parameters, bytes and active parameters per group of a MoE model")
    p.add_argument("model", help="local model directory or Hub id (only config.json is read)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quantize", choices=["4bit"], help="load the weights in moetune's 4-bit and measure resident bytes")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub repo")
    p.set_defaults(run=_inspect)

    from moetune.tiny import TINY_ARCHS

    p = commands.add_parser("tiny", help="write a tiny random-weight MoE model and a local tokenizer")
    p.add_argument("arch", choices=TINY_ARCHS, metavar="ARCH", help=f"one of: {', '.join(TINY_ARCHS)}")
    p.add_argument("out_dir", help="directory to write")
    p.add_argument("--hidden-size", type=int, help="hidden size (default 64; keep it a multiple of 8)")
    p.add_argument("--layers", type=int, help="number of decoder layers (default 2)")
    p.add_argument("--experts", type=int, help="routed experts per MoE layer (default 4)")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    p.set_defaults(run=_tiny)

    for name, run, text in (("validate", _validate, "check a recipe as `train` does, without loading weights"),
                            ("train", _train, "run a recipe")):
        p = commands.add_parser(name, help=text)
        p.add_argument("recipe", help="recipe YAML file, or a packaged recipe's name (`moetune recipes` lists them)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set train.learning_rate=1e-4 (repeatable)")
        if name == "validate":
            p.add_argument("--schema-only", action="store_true",
                           help="check only the recipe's schema and files (instant: does not import trl)")
        if name == "train":
            mode = p.add_mutually_exclusive_group()
            mode.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output.dir")
            mode.add_argument("--overwrite", action="store_true", help="replace a non-empty output.dir")
            _add_verbosity(p)
        p.set_defaults(run=run)

    _add_data_parser(commands)

    p = commands.add_parser("routing", help="measure expert load, entropy and dead experts of a model on some data")
    p.add_argument("model", help="a moetune run dir (the trained model: base + adapter), any model dir, or a Hub id")
    p.add_argument("data", help="data file (.jsonl/.json/.csv/.parquet) in any moetune data format")
    p.add_argument("--max-examples", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="also write routing.json and routing.png to this directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_routing)

    p = commands.add_parser("chat", help="talk to a trained model in the terminal (streamed; /reset, /quit)")
    _add_generation_args(p)
    p.set_defaults(run=_chat)

    p = commands.add_parser("generate", help="complete prompts in batches (greedy by default)")
    _add_generation_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (a user turn of the chat template, unless --raw)")
    source.add_argument("--file", help='.jsonl file with {"prompt": text or messages} or {"messages": [...]} rows')
    p.add_argument("--out", help="write {prompt, completion} rows to this .jsonl file (default: print them)")
    p.add_argument("--raw", action="store_true", help="feed text prompts as they are, without the chat template")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(run=_generate)

    from moetune.merging import MERGE_DTYPES

    p = commands.add_parser("merge", help="fold a LoRA run into a plain checkpoint (verified) for serving engines")
    p.add_argument("run_dir", help="a LoRA run's output directory")
    p.add_argument("out_dir", help="directory to write the merged model to (must not exist)")
    p.add_argument("--dtype", choices=MERGE_DTYPES, default="bfloat16", help="dtype of the merged weights")
    p.set_defaults(run=_merge)

    p = commands.add_parser("push", help="upload a run (adapter or model, tokenizer, card, recipe) to the Hub")
    p.add_argument("run_dir", help="a run's output directory")
    p.add_argument("repo_id", help="owner/name of the Hub model repo (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to push to (created when missing; default main)")
    p.add_argument("--merged", action="store_true", help="merge the adapter first and push the merged model")
    p.add_argument("--dtype", choices=MERGE_DTYPES, default="bfloat16", help="dtype of the merged model (--merged)")
    p.set_defaults(run=_push)
    _add_tool_commands(parser, commands)
    _add_prune_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("moetune").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from moetune.console import quiet_third_party, set_quiet

    set_quiet(args.quiet and not args.verbose)
    quiet_third_party(verbose=args.verbose)
    if int(os.environ.get("RANK", "0")) > 0 and not args.verbose:  # under DDP only rank 0 speaks; errors still do
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("moetune").setLevel(logging.ERROR)
    try:
        args.run(args)
    except MoetuneError as err:
        if args.verbose:
            raise
        print(f"moetune {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"moetune {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def run(argv: list[str] | None = None) -> None:
    """The `moetune` command and `python -m moetune`: `main`, then leave the process.

    A run that joined a process group (torchrun / accelerate launch) leaves with `os._exit` once its group is torn
    down and its output flushed: gloo can abort a process at interpreter exit after the work is done ("terminate
    called without an active exception", SIGABRT, seen on 2 CPU ranks after a finished FSDP2 run), which would turn
    a finished run into a failed launch (docs/upstream.md#gloo-exit-abort). Exit-time handlers are skipped only then.
    """
    code = main(argv)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 -- leaving anyway; the run's outcome is already decided
            pass
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
