"""transformers' Trainer set up for an ALIA stage: the training loop each local-engine worker runs.

Kept apart from Ray so the benchmark can run the very same loop in plain transformers and compare.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from alia_nemo.config.resolve import ResolvedStage
from alia_nemo.config.schema import AliaConfig
from alia_nemo.model.chatml import GENERATION_DEFAULTS

CHECKPOINT_FILES = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt")


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` can not be resumed from (None when every file it needs is there and sound)."""
    from alia_nemo.model.checkpoints import torch_file_problem, weights_problem

    missing = [f for f in CHECKPOINT_FILES if not (ckpt / f).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{ckpt / 'trainer_state.json'} is not readable JSON"
    problems = [weights_problem(ckpt)] + [torch_file_problem(ckpt / f) for f in ("optimizer.pt", "scheduler.pt")]
    return next((p for p in problems if p), None)


def newest_complete_checkpoint(checkpoint_dir: Path, move_aside: bool = False) -> Path | None:
    """The highest ``checkpoint-N`` whose files are all present and sound (a killed or torn save leaves a bad one).

    With ``move_aside`` (one process of a run), bad ones newer than it move to ``incomplete-checkpoints/`` next
    to ``checkpoint_dir``: kept for inspection, out of the way of the Trainer's rotation, never deleted.
    """
    if not checkpoint_dir.is_dir():
        return None
    candidates = sorted(
        (p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        print(f"[alia-nemo] skipping checkpoint {ckpt}: {problem}", flush=True)
        if move_aside and ckpt.is_dir():
            aside = checkpoint_dir.parent / "incomplete-checkpoints" / f"{ckpt.name}-{time.strftime('%Y%m%dT%H%M%S')}"
            aside.parent.mkdir(exist_ok=True)
            ckpt.rename(aside)
            print(f"[alia-nemo] moved it to {aside}", flush=True)
    return None


# Logged values that end a run when they stop being finite, with the words its error uses.
NONFINITE_WATCHED = (("loss", "training loss"), ("eval_loss", "validation loss"), ("grad_norm", "gradient norm"))


class SFTCollator:
    """Right-pads a micro-batch: ``<pad>`` for inputs, -100 (no loss) for labels."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def build_model(cfg: AliaConfig, stage: ResolvedStage):
    """The stage's starting model: pretrained weights when given, else a seeded random init of the spec."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from alia_nemo.model.architectures import get_spec

    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.pretrained:
        # A stage that changes RoPE (the CPT stages) rewrites the starting model's context and rotary
        # settings; the model saved at the end records them, which is how the next stage inherits them.
        return AutoModelForCausalLM.from_pretrained(
            cfg.model.pretrained,
            dtype=dtype,
            local_files_only=not cfg.model.allow_download,
            **stage.hf_overrides,
        )
    torch.manual_seed(cfg.run.seed)
    hf_config = get_spec(cfg.model.arch).hf_config(cfg.stage.seq_length, cfg.stage.rope.settings())
    return LlamaForCausalLM(hf_config).to(dtype)


def training_arguments(cfg: AliaConfig, stage: ResolvedStage, output_dir: Path, use_cpu: bool, report_to: list[str]):
    """transformers ``TrainingArguments`` for the resolved stage: AdamW, schedule, clipping, checkpoints, logging.

    The step count is the resolved one (whole global batches per epoch, as NeMo-RL counts them), not the
    Trainer's own, so the local engine takes as many steps as ``plan``, ``show`` and ``compile`` report.
    """
    from transformers import TrainingArguments

    has_val = stage.val_rows > 0
    eval_every = stage.eval_every  # run.eval_every resolved (auto: about 10 validations per run; 0: at the end only)
    return TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        per_device_train_batch_size=cfg.stage.micro_batch_size,
        per_device_eval_batch_size=cfg.stage.micro_batch_size,
        gradient_accumulation_steps=stage.grad_accumulation,
        learning_rate=cfg.stage.lr,
        lr_scheduler_type="cosine" if cfg.stage.lr_scheduler == "cosine" else "constant_with_warmup",
        warmup_steps=cfg.stage.warmup_steps,
        weight_decay=cfg.stage.weight_decay,
        adam_beta1=cfg.stage.adam_beta1,
        adam_beta2=cfg.stage.adam_beta2,
        adam_epsilon=cfg.stage.adam_eps,
        optim="adamw_torch_fused",  # AdamW, fused kernel (CPU and CUDA)
        max_grad_norm=cfg.stage.grad_clip,
        num_train_epochs=cfg.stage.epochs,
        max_steps=stage.steps or -1,
        dataloader_drop_last=True,  # every step a whole global batch
        save_strategy="steps",
        save_steps=cfg.run.save_every,
        save_total_limit=cfg.run.keep_checkpoints,
        logging_steps=cfg.run.log_every,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # the default logs a NaN loss as a made-up finite one: the run must stop
        report_to=report_to,
        eval_strategy="steps" if has_val and eval_every else "no",
        eval_steps=eval_every or None,
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        use_cpu=use_cpu,
        bf16=cfg.model.dtype == "bfloat16" and not use_cpu,
        # The loss is the mean over the trained tokens of the whole global batch (all micro-batches
        # and all workers), not a mean of per-micro-batch means.
        average_tokens_across_devices=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )


def metrics_callback(path: Path, print_every: int, shown: tuple[tuple[str, str], ...] = ()):
    """A Trainer callback (main process only) that appends every log event to ``metrics.jsonl`` and prints
    one short progress line every ``print_every`` steps (in place of transformers' per-step dict dump): step of
    total, loss, learning rate, tokens per second (non-padding input tokens of all workers, as the Trainer counts
    them) and the time left (:class:`alia_nemo.engines.progress.Progress`).

    ``shown`` adds ``(logged key, label)`` pairs to the progress and validation lines when they were logged
    (DPO shows its reward margin and accuracy; the validation line reads the key with an ``eval_`` prefix).
    """

    def extra(logs: dict, prefix: str = "") -> str:
        return "".join(f" {label} {logs[prefix + key]:.4f}" for key, label in shown if prefix + key in logs)

    from transformers import TrainerCallback

    from alia_nemo.engines.progress import Progress

    progress: Progress | None = None

    def tokens_seen(state) -> float | None:
        return float(state.num_input_tokens_seen) if state.num_input_tokens_seen else None

    def append(row: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    class MetricsCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # Marks each attempt; after a resume its step is the checkpoint's.
            nonlocal progress
            if state.is_world_process_zero:
                append({"event": "train_begin", "step": state.global_step, "time": time.time()})
                progress = Progress(state.max_steps)
                progress.begin(state.global_step, state.num_input_tokens_seen or 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            if state.is_world_process_zero:
                append({"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs})
            # Every worker sees the same (all-reduced) logs, so all stop here together; the Trainer logs a step
            # before it saves its checkpoint, so no checkpoint of this step and no final/ are written.
            for key, which in NONFINITE_WATCHED:
                value = logs.get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    from alia_nemo.engines import nonfinite_error

                    raise nonfinite_error(path.parent if state.is_world_process_zero else None, which,
                                          value, state.global_step)  # fmt: skip
            if not state.is_world_process_zero:
                return
            step = state.global_step
            if "loss" in logs and (step % print_every == 0 or step in (1, state.max_steps)):
                rates = progress.suffix(step, tokens_seen(state)) if progress else ""
                print(
                    f"[alia-nemo] step {step}/{state.max_steps} loss {logs['loss']:.4f}{extra(logs)} "
                    f"lr {logs.get('learning_rate', 0):.3g}{rates}",
                    flush=True,
                )
            if "eval_loss" in logs:
                print(f"[alia-nemo] step {step} validation loss {logs['eval_loss']:.4f}{extra(logs, 'eval_')}",
                      flush=True)  # fmt: skip

    return MetricsCallback()


def prepare_worker(cfg: AliaConfig, output_dir: Path) -> None:
    """Per-process setup every training loop does first: torch threads and the TensorBoard directory."""
    import torch

    threads = cfg.engine.torch_threads or max(1, (os.cpu_count() or 1) // cfg.engine.num_workers)
    torch.set_num_threads(threads)
    # transformers' TensorBoard callback reads its directory from the environment only.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(output_dir / "tensorboard")


def resume_point(cfg: AliaConfig, output_dir: Path) -> Path | None:
    """The checkpoint to resume from (``run.resume``), bad newer ones moved aside by the first process only."""
    first = int(os.environ.get("RANK", "0")) == 0
    return newest_complete_checkpoint(output_dir / "checkpoints", move_aside=first) if cfg.run.resume else None


def save_final(trainer, tokenizer, output_dir: Path) -> None:
    """``output_dir/final``: the trained weights, the tokenizer and ALIA's generation defaults (a chat-ready model)."""
    from transformers import GenerationConfig

    final = output_dir / "final"
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(final))
        GenerationConfig(**GENERATION_DEFAULTS).save_pretrained(str(final))
        from alia_nemo.model.export import umask_modes

        umask_modes(final)  # safetensors writes model.safetensors 0600; final/ is served and shared like an export


def run_metadata(trainer, resume: Path | None) -> dict[str, Any]:
    """What every engine result records beside the Trainer's metrics: steps taken, resume point, layout."""
    return {
        "global_step": trainer.state.global_step,
        "resumed_from": resume.name if resume else None,
        "world_size": trainer.args.world_size,
        "grad_accumulation": trainer.args.gradient_accumulation_steps,
    }


def final_evaluation(trainer, dataset) -> dict[str, Any]:
    """The validation metrics at the last step: the scheduled evaluation's when it ran there, else a new one.

    ``dataset`` is a callable returning the validation set (built only when it is needed). Evaluating twice at the
    last step would print (and log) the same validation line twice.
    """
    last = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") == last and "eval_loss" in entry:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return trainer.evaluate(dataset())


def train_sft(
    cfg: AliaConfig,
    stage: ResolvedStage,
    train_rows,
    val_rows,
    tokenizer_dir: Path,
    output_dir: Path,
    use_cpu: bool = True,
    report_to: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the stage with transformers' Trainer; the final model goes to ``output_dir/final``.

    Works alone or inside a Ray Train worker (torch.distributed already set up: DDP over gloo/NCCL).
    Returns the Trainer's train metrics plus where it resumed from.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, Trainer

    prepare_worker(cfg, output_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = build_model(cfg, stage)
    args = training_arguments(cfg, stage, output_dir, use_cpu, ["tensorboard"] if report_to is None else report_to)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if val_rows and args.eval_strategy != "no" else None,
        data_collator=SFTCollator(tokenizer.pad_token_id),
        callbacks=[metrics_callback(output_dir / "metrics.jsonl", cfg.run.print_every)],
    )
    trainer.remove_callback(PrinterCallback)  # one dict per step drowns the console (and Ray's log stream)
    resume = resume_point(cfg, output_dir)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics = dict(result.metrics)
    if val_rows:  # the final validation loss, whatever the cadence during training
        metrics.update(final_evaluation(trainer, lambda: Dataset.from_list(val_rows)))
    save_final(trainer, tokenizer, output_dir)
    metrics.update(run_metadata(trainer, resume))
    return metrics
