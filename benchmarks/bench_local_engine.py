"""Throughput of the local engine against plain transformers on the default job.

Runs, in this one process, (1) a plain ``transformers.Trainer`` on the default job's model and data
(no Ray, no alia-nemo training code) and (2) ``alia-nemo``'s local engine (Ray Train + the same
Trainer) on the same configuration, and prints tokens/s for both and their ratio.

Two figures per side:
  loop   tokens / seconds inside the training loop (Trainer's train_runtime): the steady-state cost
  wall   tokens / seconds from start to trained model, including Ray start-up and data preparation

Target: loop ratio (engine / plain) >= 0.8. Runs of the default job take ~15 s each on 2 cores, where
run-to-run noise is +-15%: use --repeats 5 or more and read the median per-run ratio too.

    python benchmarks/bench_local_engine.py [--repeats N] [--json OUT] [hydra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

TARGET = 0.8


def plain_transformers(cfg, out: Path) -> dict:
    """The same model, data and hyperparameters trained with nothing but transformers."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, LlamaForCausalLM, Trainer, TrainingArguments

    from alia_nemo.data.sources import load_for_training
    from alia_nemo.model.architectures import get_spec
    from alia_nemo.model.tokenizer import load_tokenizer

    start = time.perf_counter()
    torch.set_num_threads(cfg.engine.torch_threads or os.cpu_count() or 1)
    tok = load_tokenizer(cfg.model.tokenizer)
    data, stage = load_for_training(cfg, tok)
    torch.manual_seed(cfg.run.seed)
    model = LlamaForCausalLM(get_spec(cfg.model.arch).hf_config(cfg.stage.seq_length))
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.stage.micro_batch_size,
        gradient_accumulation_steps=stage.grad_accumulation,
        learning_rate=cfg.stage.lr,
        lr_scheduler_type=cfg.stage.lr_scheduler,
        warmup_steps=cfg.stage.warmup_steps,
        max_grad_norm=cfg.stage.grad_clip,
        num_train_epochs=cfg.stage.epochs,
        max_steps=stage.steps or -1,
        dataloader_drop_last=True,
        save_strategy="no",
        logging_steps=cfg.run.log_every,
        report_to=[],
        use_cpu=True,
        seed=cfg.run.seed,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(data.train),
        data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100),
    )
    result = trainer.train()
    wall = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen
    return {
        "tokens": tokens,
        "loop_s": result.metrics["train_runtime"],
        "wall_s": wall,
        "steps": trainer.state.global_step,
        "final_loss": trainer.state.log_history[-2].get("loss"),
    }


def local_engine(cfg) -> dict:
    from alia_nemo.engines.local import run_local

    start = time.perf_counter()
    summary = run_local(cfg)
    wall = time.perf_counter() - start
    train = summary["train"]
    return {
        "tokens": train["num_input_tokens_seen"],
        "loop_s": train["train_runtime"],
        "wall_s": wall,
        "steps": train["global_step"],
        "final_loss": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("overrides", nargs="*")
    ns = parser.parse_args()

    from alia_nemo.config.compose import load_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(ns.repeats):
            cfg = load_config([*ns.overrides, f"run.output_dir={tmp}/engine{i}", "run.save_every=100000"])
            # Alternate the order: on 2 cores, whichever runs second inherits a warmer (or busier) machine.
            if i % 2 == 0:
                plain = plain_transformers(cfg, Path(tmp) / f"plain{i}")
                engine = local_engine(cfg)
            else:
                engine = local_engine(cfg)
                plain = plain_transformers(cfg, Path(tmp) / f"plain{i}")
            ratio = (engine["tokens"] / engine["loop_s"]) / (plain["tokens"] / plain["loop_s"])
            rows.append({"plain": plain, "engine": engine, "loop_ratio": ratio})

    def rate(side: str, kind: str) -> float:
        return sum(r[side]["tokens"] for r in rows) / sum(r[side][f"{kind}_s"] for r in rows)

    report = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "overrides": ns.overrides,
        "runs": rows,
        "plain_loop_tok_s": rate("plain", "loop"),
        "engine_loop_tok_s": rate("engine", "loop"),
        "plain_wall_tok_s": rate("plain", "wall"),
        "engine_wall_tok_s": rate("engine", "wall"),
    }
    report["loop_ratio"] = report["engine_loop_tok_s"] / report["plain_loop_tok_s"]
    report["loop_ratio_median"] = statistics.median(r["loop_ratio"] for r in rows)
    report["wall_ratio"] = report["engine_wall_tok_s"] / report["plain_wall_tok_s"]
    for side, name in (("plain", "plain transformers"), ("engine", "alia-nemo local   ")):
        loop, wall = report[f"{side}_loop_tok_s"], report[f"{side}_wall_tok_s"]
        print(f"{name} : {loop:9.0f} tok/s in the loop, {wall:9.0f} tok/s wall")
    print(f"ratio engine/plain : {report['loop_ratio']:.3f} loop (target >= {TARGET}), {report['wall_ratio']:.3f} wall")
    runs = ", ".join(f"{r['loop_ratio']:.3f}" for r in rows)
    print(f"per-run loop ratios: {runs}; median {report['loop_ratio_median']:.3f}")
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
