"""``alia-nemo <command> [hydra overrides]``: one dispatcher for every command."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from alia_nemo.errors import AliaError, ConfigError, describe_os_error

OVERRIDES_HELP = (
    "Hydra overrides: key=value changes a key (stage.lr=2e-5), group=option picks a config group option "
    "(model=alia_40b, stage=sft), recipe=NAME starts from recipes/NAME.yaml (recipe=PATH.yaml from a recipe file "
    "anywhere, e.g. a `recipes copy`), +key=value adds a key, ~key deletes one."
)
EXAMPLES = """examples:
  alia-nemo train                                   # tiny ALIA on the bundled sample, CPU, in-process Ray
  alia-nemo train engine.num_workers=2 run.output_dir=outputs/dp2
  alia-nemo show model=alia_40b stage=sft
  alia-nemo model-info model=alia_40b
  alia-nemo show recipe=sft-alia-tiny-1n0g-dp2
  alia-nemo recipes                                 # every recipe and pipeline: purpose, stage, model, GPUs
  alia-nemo recipes copy sft-alia-tiny-1n0g-dp2 my/recipe.yaml && alia-nemo validate recipe=my/recipe.yaml
  alia-nemo compile recipe=sft-alia-40b-16n4g-megatron-tp4pp4cp4-actckpt --out sft40b.yaml
  alia-nemo pipeline recipe=alia-tiny-instruct       # CPT -> CPT -> SFT -> export -> eval on CPU
"""


def _cmd_show(args: argparse.Namespace) -> int:
    from alia_nemo.config.compose import available_recipes, load_config, to_yaml
    from alia_nemo.config.resolve import describe, resolve

    if args.list_recipes:
        print("\n".join(available_recipes()))
        return 0
    cfg = load_config(args.overrides)
    print(to_yaml(cfg), end="")
    print(describe(cfg, resolve(cfg)), end="")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from alia_nemo import recipes

    if args.overrides:
        raise ConfigError(f"recipes takes no overrides ({' '.join(args.overrides)}); see `alia-nemo recipes --help`")
    if args.action == "copy":
        kind, out = recipes.copy_recipe(args.name, args.path, force=args.force)
        run = "pipeline" if kind == "pipeline" else "validate"
        print(f"[alia-nemo] copied {kind} {args.name} to {out}; edit it, then: alia-nemo {run} recipe={out}")
        return 0
    cat = recipes.catalogue()
    if args.json:
        print(json.dumps(cat, indent=2))
    else:
        print(recipes.catalogue_text(cat, width=max(80, shutil.get_terminal_size((120, 24)).columns)), end="")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from alia_nemo import recipes

    summary = recipes.validate(args.overrides, check_memory=not args.skip_memory_check)
    if args.json:
        recipes.print_validation_json(summary)
    else:
        recipes.print_validation(summary)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from alia_nemo.config.compose import load_config
    from alia_nemo.engines import run_stage

    summary = run_stage(load_config(args.overrides))
    train = summary["train"]
    line = f"[alia-nemo] done: {train.get('global_step')} steps"
    if "first_loss" in train:
        line += f", loss {train['first_loss']:.3f} (first step) -> {train['last_loss']:.3f} (last step)"
    if "eval_loss" in train:
        line += f", validation loss {train['eval_loss']:.3f}"
    if "last_margin" in train:  # a DPO stage: how far the preferences moved
        line += f", reward margin {train['first_margin']:.3f} -> {train['last_margin']:.3f}"
        line += f", preference accuracy {train['last_accuracy']:.2f}"
        if "eval_rewards/accuracy" in train:
            line += f" (validation {train['eval_rewards/accuracy']:.2f})"
    print(line)
    print(f"[alia-nemo] final model: {summary['final_model']}\n[alia-nemo] loss curve: {summary['loss_plot']}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from alia_nemo.config.compose import load_config
    from alia_nemo.config.resolve import resolve
    from alia_nemo.data.cache import read_manifest
    from alia_nemo.data.sources import source_for

    cfg = load_config(args.overrides)
    source, stage = source_for(cfg.data), resolve(cfg)
    if args.dry_run:
        plan = source.plan(cfg, stage)
        if args.json:
            print(json.dumps(plan, indent=2))
        else:
            source.print_plan(plan)
        return 0
    from alia_nemo.model.tokenizer import TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.model.tokenizer, allow_download=cfg.model.allow_download)
    except TokenizerError as exc:  # prepare tokenises, so it needs it; --dry-run and fetch are the ways around
        same = shlex.join(args.overrides)
        raise AliaError(
            f"{exc}\nOn a node with network (same HF_HOME), `alia-nemo fetch {same}` caches it; "
            f"`alia-nemo prepare --dry-run {same}` shows the plan without it."
        ) from exc
    out = source.prepare(cfg, stage, tokenizer)
    manifest = read_manifest(out)
    if args.json:
        prepared = resolve(cfg, manifest)
        print(json.dumps({"prepared": str(out), "train_rows": prepared.train_rows, "val_rows": prepared.val_rows,
                          "steps": prepared.steps, **_prepared_summary(manifest)}, indent=2))  # fmt: skip
    else:
        source.print_prepared(cfg, out, manifest)
    return 0


def _prepared_summary(manifest: dict) -> dict:
    """The manifest's own totals (a mixture's per-reason totals, a corpus' window and packing numbers)."""
    keys = ("totals", "train_windows", "train_windows_needed", "val_windows", "shortfall_windows", "packing")
    return {k: manifest[k] for k in keys if k in manifest}


def _cmd_plan(args: argparse.Namespace) -> int:
    from alia_nemo.config.compose import load_config
    from alia_nemo.config.planner import Gpu, plan
    from alia_nemo.config.resolve import resolve, steps_for_tokens
    from alia_nemo.model.architectures import get_spec

    cfg = load_config(args.overrides)
    cl = cfg.cluster
    if not (cl.gpus_per_node and cl.gpu_memory_gb and cl.gpu_peak_tflops):
        raise ConfigError(
            f"cluster={cl.name} has no GPUs to plan for; pick a GPU profile (cluster=mn5_acc or cluster=h100_8x80) "
            "or set cluster.gpus_per_node, cluster.gpu_memory_gb and cluster.gpu_peak_tflops"
        )
    stage = resolve(cfg)
    result = plan(get_spec(cfg.model.arch), stage.seq_length, stage.global_batch_size, cl.num_nodes,
                  cl.gpus_per_node, Gpu(cl.gpu_memory_gb, cl.gpu_peak_tflops),
                  dpo=cfg.stage.kind == "dpo")  # fmt: skip
    steps = stage.steps
    if args.tokens:  # a token budget given here wins (full windows of seq_length tokens)
        steps = steps_for_tokens(int(args.tokens), stage.global_batch_size, stage.seq_length)
    for row in result["ranked"]:
        row["stage_hours"] = round(row["step_s"] * steps / 3600, 2) if steps else None
    result["steps"] = steps
    result["resolved"] = stage.as_dict()
    if args.json:
        print(json.dumps(result if args.all else {k: v for k, v in result.items() if k != "layouts"}, indent=2))
        return 0 if result["ranked"] else 1
    _print_plan_table(result, cl, args.top)
    return 0 if result["ranked"] else 1


def _print_plan_table(result: dict, cluster, top: int) -> None:
    from rich.table import Table

    from alia_nemo.data.report import console

    title = (
        f"{result['model']} at {result['seq_length']:,} tokens, global batch {result['global_batch']}, on "
        f"{cluster.num_nodes} x {cluster.gpus_per_node} {cluster.gpu_name} ({cluster.gpu_memory_gb:g} GB)"
    )
    table = Table(title=title)
    cols = ("TP", "PP", "CP", "DP", "mb", "recompute", "weights+grads", "optimizer", "activations", "logits",
            "total GiB", "step s", "stage h")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "recompute" else "right")
    for row in result["ranked"][:top]:
        lay, mem = row["layout"], row["memory_gib"]
        table.add_row(
            *[str(lay[k]) for k in ("tp", "pp", "cp", "dp", "micro_batch", "recompute")],
            f"{mem['weights'] + mem['gradients']:.1f}", f"{mem['optimizer']:.1f}", f"{mem['activations']:.1f}",
            f"{mem['logits_and_loss']:.1f}", f"{mem['total']:.1f}", f"{row['step_s']:.1f}",
            "-" if row["stage_hours"] is None else f"{row['stage_hours']:.1f}",
        )  # fmt: skip
    console().print(table)
    valid = [r for r in result["layouts"] if r["valid"]]
    print(f"{len(result['ranked'])} of {len(valid)} valid layouts fit ({len(result['layouts']) - len(valid)} invalid); "
          "estimates, not measurements: see alia_nemo/config/planner.py for the model and its constants. Step times "
          "assume every sequence is seq_length tokens long (an upper bound for unpacked SFT).")  # fmt: skip
    if not result["ranked"]:
        best = min(valid, key=lambda r: r["memory_gib"]["total"], default=None)
        if best:
            print(
                f"nothing fits: the smallest estimate is {best['memory_gib']['total']:.1f} GiB with "
                f"{best['layout']}; add nodes, context parallelism or recompute"
            )


def _cmd_compile(args: argparse.Namespace) -> int:
    import yaml

    from alia_nemo.config.compose import load_config
    from alia_nemo.config.to_nemo_rl import header
    from alia_nemo.data.reader import DataError
    from alia_nemo.engines.nemo_rl_prepare import compile_stage
    from alia_nemo.model.tokenizer import TokenizerError

    cfg = load_config(args.overrides)
    try:
        compiled = compile_stage(cfg, prepare=not args.no_prepare, check_memory=not args.skip_memory_check)
    except (TokenizerError, DataError) as exc:  # preparing needs the tokenizer and the data: offline nodes lack them
        if args.no_prepare:
            raise
        again = shlex.join(["alia-nemo", "compile", *args.overrides, "--out", args.out, "--no-prepare"])
        raise AliaError(
            f"{exc}\nTo compile without preparing the data (no tokenizer or data read: steps from the requested "
            f"counts, a placeholder dataset path; prepare and compile again where they are), add --no-prepare: {again}"
        ) from exc
    command = "alia-nemo compile " + " ".join(args.overrides)
    text = header(cfg, compiled, command.strip()) + yaml.safe_dump(compiled.config, sort_keys=False, width=120)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    if args.json:
        print(json.dumps({"out": str(out), **compiled.derived}, indent=2))
    else:
        d = compiled.derived
        lay = d["layout"]
        print(f"[alia-nemo] wrote {out}")
        print(
            f"[alia-nemo] {d['train_rows']:,} {d['resolved']['unit']} "
            f"({d['counted_from']}), {d['max_num_steps']:,} "
            f"steps; TP{lay['tp']} PP{lay['pp']} CP{lay['cp']} DP{lay['dp']} on {d['gpus']} GPUs"
        )
        script = "run_dpo.py" if "dpo" in compiled.config else "run_sft.py"
        print(f"[alia-nemo] run it: uv run examples/{script} --config {out.resolve()}  (in a NeMo-RL checkout)")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from alia_nemo.launch import submit

    job_id = submit.submit(args.run, args.overrides, args.address, args.env)
    print(job_id, flush=True)
    if args.follow:
        submit.follow(job_id, args.address)
    if args.wait or args.follow:
        final = submit.wait(job_id, args.address)
        print(f"[alia-nemo] job {job_id} {final}", file=sys.stderr)
        return submit.EXIT_CODES[final]
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    from alia_nemo.launch import submit

    if args.action == "status":
        info = submit.status(args.job_id, args.address)
        print(json.dumps(info, indent=2))
        return 0
    if args.action == "logs":
        if args.follow:
            submit.follow(args.job_id, args.address)
        else:
            print(submit.logs(args.job_id, args.address), end="")
        return 0
    stopped = submit.stop(args.job_id, args.address)
    print(f"[alia-nemo] job {args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from alia_nemo.config.compose import load_config
    from alia_nemo.model.hub_cache import fetch, hub_ids

    cfg = load_config(args.overrides)
    if not hub_ids(cfg):
        print("[alia-nemo] nothing to fetch: the model and tokenizer are local or built in")
        return 0
    for repo, path in fetch(cfg).items():
        print(f"[alia-nemo] {repo} -> {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from alia_nemo.model.export import export

    out = export(Path(args.source), Path(args.out), args.tokenizer, force=args.force)
    print(f"[alia-nemo] exported {args.source} -> {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.kind == "harness":
        from alia_nemo.eval import harness

        argv = harness.command(Path(args.out), args.model, args.endpoint, args.served_model,
                               args.languages.split(",") if args.languages else None, args.limit,
                               tasks=args.tasks.split(",") if args.tasks else None, include_path=args.include_path,
                               device=args.device, batch_size=args.batch_size, dtype=args.dtype)  # fmt: skip
        print("[alia-nemo] " + " ".join(argv), flush=True)
        if args.dry_run:
            return 0
        rc = harness.run(argv)
        found = harness.results_files(Path(args.out))
        if rc == 0 and found:
            print(f"[alia-nemo] results {found[-1]}")
        return rc
    if args.kind == "judge":
        from alia_nemo.eval import judge

        max_new = 1024 if args.max_new_tokens is None else args.max_new_tokens  # step-by-step answers run long
        files = judge.evaluate(
            args.task, Path(args.out), model_dir=args.model, endpoint=args.endpoint, served_model=args.served_model,
            judge_endpoint=args.judge_endpoint, judge_model=args.judge_model,
            languages=args.languages.split(",") if args.languages else None, instances=args.instances, seed=args.seed,
            concurrency=args.concurrency, temperature=args.temperature, max_new_tokens=max_new,
            timeout=args.timeout, retries=args.retries,
        )  # fmt: skip
        print(f"[alia-nemo] results {files['json']}, chart {files['png']}")
        return 0
    from alia_nemo.eval import niah

    if bool(args.model) == bool(args.endpoint):
        raise ConfigError("give exactly one of --model DIR (an export, transformers) or --endpoint URL")
    if args.endpoint and not (args.served_model and args.tokenizer):
        raise ConfigError("--endpoint needs --served-model and --tokenizer (to size the haystacks in tokens)")
    if args.timeout <= 0 or args.retries < 0:
        raise ConfigError(f"--timeout {args.timeout:g} / --retries {args.retries}: need > 0 seconds and >= 0 retries")
    args.max_new_tokens = 64 if args.max_new_tokens is None else args.max_new_tokens  # niah's default
    # Checked before anything is asked of a server; without --lengths the grid waits for the model's context.
    lengths, depths = niah.parse_grid(args.lengths or ",".join(map(str, niah.CARD_LENGTHS)), args.depths)
    haystack = Path(args.haystack).read_text(encoding="utf-8") if args.haystack else niah.default_haystack()
    name = args.model or args.served_model
    # Endpoints first (their URLs are checked), then the context and the trials on disk, then the slow part: loading
    # a model.
    endpoint = (niah.OpenAIBackend(args.endpoint, args.served_model, max_tokens=args.max_new_tokens,
                                   timeout=args.timeout, retries=args.retries) if args.endpoint else None)  # fmt: skip
    judge = (niah.OpenAIBackend(args.judge_endpoint, args.judge_model, max_tokens=512, timeout=args.timeout,
                                retries=args.retries) if args.judge_endpoint else None)  # fmt: skip
    context = niah.find_context(args.model, endpoint, args.tokenizer)
    if args.lengths is None:  # the default grid follows the model: nothing longer than it can read
        lengths = niah.default_lengths(context.tokens)
    for line in niah.grid_lines(lengths, depths, context, explicit=args.lengths is not None):
        print(f"[alia-nemo] {line}", flush=True)
    past = niah.beyond(lengths, context.tokens)
    if past:
        print(f"[alia-nemo] warning: --lengths beyond the model's context of {context.tokens:,} tokens "
              f"({context.source}): {', '.join(f'{n:,}' for n in past)}; a model can not be expected to find the "
              "needle there, and those cells are marked \"beyond context\" in niah.json and niah.png",
              file=sys.stderr, flush=True)  # fmt: skip
    # Everything that changes a trial's result: a rerun with other values into the same --out is refused.
    settings = {"model": name, "tokenizer": args.tokenizer or args.model, "temperature": args.temperature,
                "max_new_tokens": args.max_new_tokens, "lengths": lengths, "depths": depths,
                "haystack": niah.settings_digest(haystack),
                "judge": args.judge_model if args.judge_endpoint else None}  # fmt: skip
    store = niah.TrialStore(Path(args.out), settings)
    if store.trials:
        print(f"[alia-nemo] niah: {len(store.trials)} of {len(lengths) * len(depths)} trials already done in "
              f"{store.path}; running the rest", flush=True)  # fmt: skip
    pending = [n for n in lengths for d in depths if (n, d) not in store.trials]
    from transformers import AutoTokenizer

    if endpoint is None:
        backend = niah.TransformersBackend(args.model, max_new_tokens=args.max_new_tokens)
        tokenizer = backend.tokenizer
    else:
        backend, tokenizer = endpoint, AutoTokenizer.from_pretrained(args.tokenizer)

    def chat(msgs: list[dict[str, str]]) -> str:
        return backend.chat(msgs, args.temperature)

    if pending:  # a local model is timed on short prompts; an endpoint gets no requests beyond the grid's
        points = niah.probe(chat, tokenizer, haystack, context.tokens) if endpoint is None else []
        print(f"[alia-nemo] {niah.estimate_line(pending, points, judged=judge is not None)}", flush=True)
        print(f"[alia-nemo] niah: Ctrl-C stops; finished trials stay in {store.path} and the same command continues",
              flush=True)  # fmt: skip
    else:
        points = []
    progress = niah.GridProgress(pending, len(lengths) * len(depths), points, context.tokens)
    try:
        trials = niah.run(chat, tokenizer, haystack, lengths, depths, judge, progress, store)
    finally:  # the bar ends before an error is printed under it
        progress.close()
    files = niah.write_results(trials, Path(args.out), {"model": name, "temperature": args.temperature,
                                                         "judge": args.judge_model if judge else None,
                                                         "context": context.tokens,
                                                         "context_source": context.source})  # fmt: skip
    print(f"[alia-nemo] results {files['json']}, heat map {files['png']}")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from alia_nemo.launch.pipeline import Pipeline, load_pipeline, summary_lines

    name, run_dir = None, None
    for o in args.overrides:
        key, _, value = o.partition("=")
        if key == "recipe":
            name = value
        elif key == "run_dir":
            run_dir = Path(value)
        else:
            raise ConfigError(f"pipeline takes recipe=NAME and run_dir=DIR; {o!r}: change stages in the pipeline file")
    if not name:
        raise ConfigError("pipeline needs recipe=NAME (conf/pipeline/NAME.yaml, e.g. recipe=alia-tiny-instruct)")
    pipe = Pipeline(load_pipeline(name), run_dir)
    state = pipe.run(args.from_step, args.only)
    print(
        f"[alia-nemo] pipeline {name} done in {pipe.run_dir}: "
        + ", ".join(f"{k} {v['status']}" for k, v in state.items())
    )
    for line in summary_lines(pipe):  # where the models, the export and the scores are, the NIAH picture last
        print(f"[alia-nemo]   {line}")
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from alia_nemo.config.compose import load_config
    from alia_nemo.console import quiet_libraries
    from alia_nemo.model.architectures import parameter_report

    cfg = load_config(args.overrides)
    with quiet_libraries():  # megatron-core's import-time warnings (no Transformer Engine / Apex): --verbose shows them
        report = parameter_report(cfg.model.arch)
    print(json.dumps(report, indent=2))
    return 0 if report["agree"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alia-nemo",
        description="Train and extend ALIA-40b-instruct's post-training (long-context CPT, SFT) with NeMo-RL plugins.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from alia_nemo.about import VersionAction

    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, help_: str, fn: Callable[[argparse.Namespace], int], description: str = ""
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=description or help_,
            epilog=EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("overrides", nargs="*", metavar="OVERRIDE", help=OVERRIDES_HELP)
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
        p.add_argument(
            "--verbose",
            action="store_true",
            help="show everything Ray and the libraries print (a run keeps it all in its logs/console.log)",
        )
        p.set_defaults(fn=fn)
        return p

    add(
        "train",
        "train a stage (default: tiny ALIA on the bundled sample, CPU)",
        _cmd_train,
        "Compose the configuration, prepare the data and train the stage with the configured engine. "
        "Everything goes to run.output_dir (config, data report, metrics.jsonl, TensorBoard, checkpoints, "
        "loss.png, final/). Rerunning with the same run.output_dir resumes from its newest checkpoint.",
    )
    show = add(
        "show",
        "print the resolved configuration as YAML",
        _cmd_show,
        "Compose and validate the configuration and print it, fully resolved, as YAML.",
    )
    show.add_argument("--list-recipes", action="store_true", help="list the recipes recipe=NAME accepts")
    check = add(
        "validate",
        "check a configuration as a run would, without running or writing anything",
        _cmd_validate,
        "Compose, validate and resolve the configuration and, for engine=nemo_rl, compile it in memory (no data "
        "prepared or tokenizer read: steps from the requested counts; layout and memory checked). Prints a short "
        "summary and exits 0, or prints the problems (each bad key named) and exits 2. Writes nothing.",
    )
    check.add_argument("--json", action="store_true", help="machine-readable summary")
    check.add_argument("--skip-memory-check", action="store_true", help="accept a layout the planner says is OOM")
    rec = sub.add_parser(
        "recipes",
        help="list every recipe and pipeline (purpose, stage, model, nodes x GPUs, tested on), or copy one to edit",
        description="Without an action: a table of every recipe (recipes/, recipe=NAME) and pipeline "
        "(conf/pipeline/, `alia-nemo pipeline recipe=NAME`) from their headers and composed configs. "
        "`copy NAME PATH` writes a recipe or pipeline to PATH for editing; run it as recipe=PATH.",
        epilog="examples:\n  alia-nemo recipes\n  alia-nemo recipes --json\n"
        "  alia-nemo recipes copy sft-alia-tiny-1n0g-dp2 my/recipe.yaml\n  alia-nemo validate recipe=my/recipe.yaml "
        "stage.lr=2e-5\n  alia-nemo train recipe=my/recipe.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rec.add_argument("--json", action="store_true", help="machine-readable output")
    rec.add_argument("--debug", action="store_true", help="show the traceback of an error")
    rec.set_defaults(fn=_cmd_recipes, overrides=[], action=None)
    rec_actions = rec.add_subparsers(dest="action", metavar="ACTION")
    rec_copy = rec_actions.add_parser(
        "copy",
        help="copy a recipe or pipeline to PATH to edit it (recipe=PATH then runs it)",
        description="Copy the recipe or pipeline NAME to PATH (a file, or a directory to keep its name; .yaml is added "
        "when PATH has no suffix). Parent directories are created; an existing file is kept unless --force.",
    )
    rec_copy.add_argument("name", metavar="NAME", help="a recipe or pipeline name (see `alia-nemo recipes`)")
    rec_copy.add_argument("path", metavar="PATH", help="where to write the copy")
    rec_copy.add_argument("--force", action="store_true", help="replace an existing file at PATH")
    rec_copy.add_argument("--debug", action="store_true", help="show the traceback of an error")
    planner = add(
        "plan",
        "rank parallel layouts of a stage on a GPU cluster by estimated memory and step time",
        _cmd_plan,
        "Enumerate tensor / pipeline / context / data parallel layouts, recompute choices and micro-batches of the "
        "model on the cluster profile (cluster=mn5_acc, cluster=h100_8x80, or cluster.* overrides), estimate "
        "per-GPU memory term by term and the step time, and rank the layouts that fit. Exits 1 when none fits.",
    )
    planner.add_argument("--json", action="store_true", help="machine-readable output (ranked layouts)")
    planner.add_argument("--all", action="store_true", help="with --json: every layout, invalid ones with reasons")
    planner.add_argument("--top", type=int, default=15, help="rows of the table (default 15)")
    planner.add_argument("--tokens", type=float, help="token budget of the stage (e.g. 36.8e9) for its wall-clock time")
    prep = add(
        "prepare",
        "prepare and cache a data mixture (data=sft_mixture)",
        _cmd_prepare,
        "Read every dataset of the mixture (hub, hub cache or local files), convert, filter, select exactly the "
        "configured counts per dataset and language, tokenise once and write Parquet shards, manifest.json and "
        "composition.png under data.prepared_root, in a directory keyed by a hash of all inputs (a rerun with "
        "identical inputs does nothing).",
    )
    prep.add_argument("--dry-run", action="store_true", help="print the plan (datasets, counts, paths); read nothing")
    prep.add_argument("--json", action="store_true", help="machine-readable output")
    sub_ = add(
        "submit",
        "submit a stage to a running Ray cluster (Ray's job API); prints the job id",
        _cmd_submit,
        "Submit `alia-nemo RUN OVERRIDES...` (RUN: train by default) as a Ray job. The overrides reach the job as "
        "an argument list, never through a shell. Forwarded environment: HF caches and offline flags, ALIA_NEMO_* "
        "data roots, and --env NAME=VALUE pairs (secret-looking names or values are refused). Exit status with --wait: "
        "0 succeeded, 1 failed, 3 stopped.",
    )
    sub_.add_argument("--address", help="job API address, http://HEAD:8265 (default: RAY_ADDRESS)")
    sub_.add_argument(
        "--run", default="train", choices=["train", "pipeline", "prepare", "compile", "show"], help="command to run"
    )
    sub_.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment variable")
    sub_.add_argument("--follow", action="store_true", help="stream the job's log until it ends (implies --wait)")
    sub_.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")
    jobs = sub.add_parser(
        "jobs",
        help="status, logs or stop of a submitted job",
        description="Inspect or stop a job submitted with `alia-nemo submit`.",
    )
    jobs.add_argument("action", choices=["status", "logs", "stop"])
    jobs.add_argument("job_id", metavar="JOB")
    jobs.add_argument("--address", help="job API address, http://HEAD:8265 (default: RAY_ADDRESS)")
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    jobs.add_argument("--debug", action="store_true", help="show the traceback of an error")
    jobs.set_defaults(fn=_cmd_jobs, overrides=[])
    add(
        "fetch",
        "download the run's model and tokenizer into the Hugging Face cache (login node, with network)",
        _cmd_fetch,
        "Download model.pretrained and model.tokenizer (hub ids) into the Hugging Face cache (HF_HOME), so that "
        "offline compute nodes find them. Run it on a login node with network and the same HF_HOME as the jobs.",
    )
    pipe = add(
        "pipeline",
        "run CPT 32k -> CPT 160k -> SFT -> export -> eval (recipe=alia-40b-instruct or alia-tiny-instruct)",
        _cmd_pipeline,
        "Run the pipeline in conf/pipeline/NAME.yaml (recipe=NAME, optionally run_dir=DIR). pipeline.json in the run "
        "directory records each step's config hash, inputs, times, status and output. A rerun skips finished steps, "
        "resumes an interrupted one from its newest checkpoint, and stops if a finished step's config changed.",
    )
    pipe.add_argument("--from", dest="from_step", help="redo from this step (and everything after it)")
    pipe.add_argument("--only", help="run just this step (earlier steps must have finished)")
    exp = sub.add_parser(
        "export",
        help="export a finished stage as a Hugging Face directory (transformers, vLLM)",
        description="Write a Hugging Face directory from a finished stage: weights, config.json (context length and "
        "RoPE as trained), tokenizer with the ChatML template in tokenizer_config.json, and generation_config.json "
        "with the card's defaults (stop on <|im_end|> and </s>, temperature 0.1, no repetition penalty). NeMo-RL "
        "checkpoints are converted with NeMo-RL's converters (run inside its container).",
    )
    exp.add_argument("--from", dest="source", required=True, help="run directory, final/, checkpoint or NeMo-RL dir")
    exp.add_argument("--out", required=True, help="directory to write: new or empty, outside the source (see --force)")
    exp.add_argument("--force", action="store_true",
                     help="replace a previous export at --out (a directory export wrote, with alia_export.json); "
                     "never any other directory")  # fmt: skip
    exp.add_argument("--tokenizer", help="tokenizer to ship when the source has none (dir or cached hub id)")
    exp.add_argument("--debug", action="store_true", help="show the traceback of an error")
    exp.set_defaults(fn=_cmd_export, overrides=[])
    ev = sub.add_parser(
        "eval",
        help="the card's evaluations: needle in a haystack (niah), benchmark task lists (harness), LLM judge (judge)",
        description="niah: the card's needle-in-a-haystack test (needle, system prompt and question as on the card) "
        "over a grid of context lengths and depths, against an export (--model) or an OpenAI-compatible endpoint; "
        "JSON results and a heat map. The default grid fits the model's context (see --lengths); the grid and a time "
        "estimate (from timed short chats) are printed before the first trial, then progress per trial. "
        "harness: the card's 0-shot task lists through lm-evaluation-harness. "
        "judge: the card's LLM-as-a-judge tasks (conf/eval/judge/*.yaml): N sampled instances per language in three "
        "prompt styles, answered by the model and graded by Prometheus-2 per criterion; mean scores, robustness "
        "(variance across styles), judge.json and judge.png; resumable from OUT/judge_results.jsonl.",
    )
    ev.add_argument("kind", choices=["niah", "harness", "judge"])
    ev.add_argument("--model", help="exported model directory (transformers)")
    ev.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    ev.add_argument("--served-model", help="model name at the endpoint")
    ev.add_argument("--tokenizer", help="niah with --endpoint: tokenizer to size haystacks")
    ev.add_argument("--out", required=True, help="output directory")
    ev.add_argument("--lengths", help="niah: prompt lengths, tokens. Default: follows the model's context (config.json "
                    "max_position_embeddings of --model or --tokenizer, or the endpoint's max_model_len): the card's "
                    "4096,16384,32768,65536,131072,163840 that fit it plus the context itself, and a quarter and a "
                    "half of it when that is under three lengths (1,024 -> 256,512,1024; 4,096 -> 1024,2048,4096); "
                    "unknown context: the card's. Longer lengths only when given here, with a warning, and marked "
                    "beyond context in niah.json and niah.png")  # fmt: skip
    ev.add_argument("--depths", default="0,10,25,50,75,90,100", help="niah: needle depths, percent")
    ev.add_argument("--temperature", type=float, default=0.0, help="niah: 0 (greedy) to 0.2, as the card advises")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="niah: default 64; judge: default 1024")
    ev.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                    help="niah, judge: seconds to wait for each endpoint reply (default 600)")  # fmt: skip
    ev.add_argument("--retries", type=int, default=3, metavar="N",
                    help="niah, judge: endpoint retries after a connection error, timeout or HTTP 5xx/429, with "
                    "exponential backoff (default 3); finished trials are kept in OUT/trials.jsonl and a rerun "
                    "continues from them (judge: OUT/judge_results.jsonl)")  # fmt: skip
    ev.add_argument("--haystack", help="niah: text file to fill the context with (default: bundled CC0 sample)")
    ev.add_argument("--judge-endpoint", help="niah, judge: OpenAI-compatible endpoint of an LLM judge (Prometheus-2)")
    ev.add_argument("--judge-model", default="prometheus-eval/prometheus-8x7b-v2.0",
                    help="niah, judge: model name at --judge-endpoint")  # fmt: skip
    ev.add_argument("--task", default="math", help="judge: task name in conf/eval/judge/ or a YAML path (default math)")
    ev.add_argument("--instances", type=int, default=250, metavar="N",
                    help="judge: instances sampled per language (default 250, as on the card)")  # fmt: skip
    ev.add_argument("--seed", type=int, default=0, help="judge: sampling seed (default 0)")
    ev.add_argument("--concurrency", type=int, default=8, metavar="N",
                    help="judge: (instance, style) answers in flight at once (default 8)")  # fmt: skip
    ev.add_argument("--languages", help="harness: comma list of es,ca,eu,gl,en (default all); judge: languages of "
                    "the task (default those with prompt styles filled in)")  # fmt: skip
    ev.add_argument("--limit", type=int, help="harness: examples per task (smoke runs)")
    ev.add_argument("--tasks", help="harness: comma list of lm-eval task or group names to run instead of the card's "
                    "lists (e.g. a group of --include-path)")  # fmt: skip
    ev.add_argument("--include-path", metavar="DIR", help="harness: folder of extra lm-eval task YAMLs")
    ev.add_argument("--device", help="harness with --model: torch device, e.g. cpu or cuda:0 (default lm-eval's)")
    ev.add_argument("--batch-size", help="harness: lm-eval batch size, a count, auto or auto:N (default 1)")
    ev.add_argument("--dtype", choices=["bfloat16", "float16", "float32", "auto"],
                    help="harness with --model: weights' dtype (default bfloat16; float32 for exact CPU)")  # fmt: skip
    ev.add_argument("--dry-run", action="store_true", help="harness: print the lm_eval command only")
    ev.add_argument("--debug", action="store_true", help="show the traceback of an error")
    ev.set_defaults(fn=_cmd_eval, overrides=[])
    comp = add(
        "compile",
        "compile a stage into a NeMo-RL v0.7 SFT or DPO config (engine=nemo_rl)",
        _cmd_compile,
        "Compose the configuration (it must use engine=nemo_rl and a GPU cluster profile), prepare the data "
        "(or find it in the cache), and write one standalone NeMo-RL YAML that upstream examples/run_sft.py (a DPO "
        "stage: examples/run_dpo.py) runs unchanged. The YAML is checked against a strict mirror of NeMo-RL's keys "
        "and the parallel layout against the model before it is written.",
    )
    comp.add_argument("--out", required=True, help="where to write the YAML")
    comp.add_argument(
        "--no-prepare",
        action="store_true",
        help="do not read data: steps from the mixture's requested counts, dataset path left as a placeholder",
    )
    comp.add_argument("--json", action="store_true", help="print the derived numbers as JSON")
    comp.add_argument("--skip-memory-check", action="store_true", help="write the YAML even if the planner says OOM")
    add(
        "model-info",
        "print parameter counts of model= as JSON (analytic, transformers, megatron-core)",
        _cmd_model_info,
        "Count the chosen model's total and embedding parameters three ways: the analytic formula, a "
        "transformers LlamaForCausalLM built on the meta device, and a megatron-core GPTModel built on the "
        "meta device. Exits 1 if they disagree.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``alia-nemo`` console script."""
    parser = build_parser()
    # Overrides may come after options (`compile --out F stage.lr=1e-5`): argparse leaves those over.
    args, rest = parser.parse_known_args(argv)
    flags = [r for r in rest if r.startswith("-") and "=" not in r.split("-", 2)[-1][:1]]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    args.overrides = list(getattr(args, "overrides", [])) + [r for r in rest if r not in flags]
    debug = args.debug or os.environ.get("ALIA_NEMO_DEBUG") == "1"
    from alia_nemo.console import set_verbose

    set_verbose(getattr(args, "verbose", False))
    try:
        return args.fn(args)
    except AliaError as exc:
        if debug:
            traceback.print_exc()
        kind = "failed" if exc.exit_code == 1 else "error"  # 1: the run itself failed, not a usage problem
        print(f"alia-nemo {args.command}: {kind}: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # disk full, permissions, a missing path: the environment, not a bug
        if debug:
            traceback.print_exc()
        print(f"alia-nemo {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alia-nemo {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so in one line; --debug shows where
        if debug:
            traceback.print_exc()
        print(
            f"alia-nemo {args.command}: internal error: {type(exc).__name__}: {exc} (this is a bug in alia-nemo; "
            "rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
