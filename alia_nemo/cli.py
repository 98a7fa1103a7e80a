"""``alia-nemo <command> [hydra overrides]``: one dispatcher for every command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from alia_nemo.chatml import ConversationError
from alia_nemo.config_schema import ConfigError
from alia_nemo.sft_data import DataError
from alia_nemo.tokenizer import TokenizerError

OVERRIDES_HELP = (
    "Hydra overrides: key=value changes a key (stage.lr=2e-5), group=option picks a config group option "
    "(model=alia_40b, stage=sft), recipe=NAME starts from recipes/NAME.yaml, +key=value adds a key, ~key deletes one."
)
EXAMPLES = """examples:
  alia-nemo train                                   # tiny ALIA on the bundled sample, CPU, in-process Ray
  alia-nemo train engine.num_workers=2 run.output_dir=outputs/dp2
  alia-nemo show model=alia_40b stage=sft
  alia-nemo model-info model=alia_40b
  alia-nemo show recipe=sft-alia-tiny-1n0g-dp2
"""

# Commands later issues deliver; the names are reserved so the dispatcher stays one.
RESERVED = {
    "prepare": "prepare and cache a data mixture",
    "compile": "compile a stage into a NeMo-RL SFT config",
    "plan": "plan the parallel layout and memory of a stage on a cluster",
    "submit": "submit a stage to a running Ray cluster",
    "pipeline": "run CPT 32k -> CPT 160k -> SFT -> export -> eval",
    "export": "export a finished stage as a Hugging Face directory",
    "eval": "run the model card's evaluations",
}


def _cmd_show(args: argparse.Namespace) -> int:
    from alia_nemo.config_compose import available_recipes, load_config, to_yaml

    if args.list_recipes:
        print("\n".join(available_recipes()))
        return 0
    print(to_yaml(load_config(args.overrides)), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from alia_nemo.config_compose import load_config
    from alia_nemo.engines import run_stage

    summary = run_stage(load_config(args.overrides))
    train = summary["train"]
    line = f"[alia-nemo] done: {train.get('global_step')} steps"
    if "first_loss" in train:
        line += f", loss {train['first_loss']:.3f} (first step) -> {train['last_loss']:.3f} (last step)"
    if "eval_loss" in train:
        line += f", validation loss {train['eval_loss']:.3f}"
    print(line)
    print(f"[alia-nemo] final model: {summary['final_model']}\n[alia-nemo] loss curve: {summary['loss_plot']}")
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from alia_nemo.architectures import parameter_report
    from alia_nemo.config_compose import load_config

    report = parameter_report(load_config(args.overrides).model.arch)
    print(json.dumps(report, indent=2))
    return 0 if report["agree"] else 1


def _reserved(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"alia-nemo {name}: not available in this version yet ({RESERVED[name]}).", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alia-nemo",
        description="Train and extend ALIA-40b-instruct's post-training (long-context CPT, SFT) with NeMo-RL plugins.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    add(
        "model-info",
        "print parameter counts of model= as JSON (analytic, transformers, megatron-core)",
        _cmd_model_info,
        "Count the chosen model's total and embedding parameters three ways: the analytic formula, a "
        "transformers LlamaForCausalLM built on the meta device, and a megatron-core GPTModel built on the "
        "meta device. Exits 1 if they disagree.",
    )
    for name, help_ in RESERVED.items():
        add(name, f"(reserved) {help_}", _reserved(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``alia-nemo`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, ConversationError, TokenizerError, FileNotFoundError) as exc:
        print(f"alia-nemo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
