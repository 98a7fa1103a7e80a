"""DPO (sigmoid loss) with transformers' Trainer: the local engine's preference stage.

The policy starts from the stage's start model; the reference model is that same start model, frozen. Its
log-probabilities of every pair are computed once, before training (:func:`attach_reference_logps`), and travel
with the rows, so only one model is ever held.

Per pair, with ``logp`` the sum (``stage.dpo.average_log_probs``: the mean) of the answer's trained-token
log-probabilities under the policy and ``ref`` the same under the reference::

    margin = beta * ((logp_chosen - ref_chosen) - (logp_rejected - ref_rejected))
    loss   = preference_loss_weight * -log(sigmoid(margin)) + sft_loss_weight * NLL per token of the chosen answer

and a step's loss is the mean over the pairs of its global batch (see :class:`DPOTrainer` for how the micro-batch
losses are scaled to get there).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from alia_nemo.config.resolve import ResolvedStage
from alia_nemo.config.schema import AliaConfig, DPOSettings
from alia_nemo.data.reader import DataError
from alia_nemo.engines.hf_training import (
    build_model,
    final_evaluation,
    metrics_callback,
    prepare_worker,
    resume_point,
    run_metadata,
    save_final,
    training_arguments,
)

if TYPE_CHECKING:
    import torch

ANSWERS = ("chosen", "rejected")
REFERENCE_FIELDS = ("ref_chosen_logp", "ref_rejected_logp")
# Per-pair statistics logged (averaged over the pairs since the last log; ``eval_``-prefixed at evaluation).
STATS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected")
# What the console progress and validation lines show beside the loss.
SHOWN = (("rewards/margin", "margin"), ("rewards/accuracy", "accuracy"))


class PairTerms(NamedTuple):
    """Per-pair tensors (shape ``[pairs]``) of one micro-batch."""

    loss: torch.Tensor
    reward_chosen: torch.Tensor  # beta * (logp_chosen - ref_chosen)
    reward_rejected: torch.Tensor
    logp_chosen: torch.Tensor  # the policy's (sum or mean, as the margin uses them)
    logp_rejected: torch.Tensor

    def stats(self) -> torch.Tensor:
        """``[pairs, len(STATS)]``, columns in :data:`STATS` order (detached)."""
        import torch

        margin = self.reward_chosen - self.reward_rejected
        cols = (self.reward_chosen, self.reward_rejected, margin, (margin > 0).float(), self.logp_chosen,
                self.logp_rejected)  # fmt: skip
        return torch.stack([c.detach().float() for c in cols], dim=1)


def check_pairs(rows: list[dict[str, Any]], what: str) -> None:
    """Refuse rows the loss can not use: mask and ids of different lengths, or an answer with no trained token."""
    for i, row in enumerate(rows):
        for answer in ANSWERS:
            ids, mask = row.get(f"{answer}_input_ids"), row.get(f"{answer}_loss_mask")
            problem = None
            if ids is None or mask is None:
                problem = f"has no {answer}_input_ids / {answer}_loss_mask"
            elif len(ids) != len(mask):
                problem = f"has {len(ids)} {answer} tokens but a loss mask of {len(mask)}"
            elif not any(mask[1:]):  # the first token is never predicted
                problem = f"has no trained token in its {answer} answer"
            if problem:
                raise DataError(
                    f"{what} preference pair {row.get('id', f'#{i}')} {problem}; rebuild the prepared data "
                    "(alia-nemo prepare) with this version of alia-nemo"
                )


class PairCollator:
    """Right-pads a micro-batch of B pairs into one batch of 2B sequences: the B chosen, then the B rejected.

    One forward pass then scores both answers of every pair. ``loss_mask`` marks the trained tokens (the answer
    and its ``<|im_end|>``); no ``labels`` key, so the Trainer counts no tokens for loss scaling (pairs are the
    unit here). ``ref_logps`` (chosen then rejected) and ``pair_index`` come along when the rows have them.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        seqs = [(r[f"{a}_input_ids"], r[f"{a}_loss_mask"]) for a in ANSWERS for r in rows]
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (seq, mask) in enumerate(seqs):
            ids[i, : len(seq)] = torch.tensor(seq)
            loss_mask[i, : len(seq)] = torch.tensor(mask)
            attention[i, : len(seq)] = 1
        batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}
        if all(f in rows[0] for f in REFERENCE_FIELDS):
            batch["ref_logps"] = torch.tensor([r[f] for f in REFERENCE_FIELDS for r in rows], dtype=torch.float32)
        if "pair_index" in rows[0]:
            batch["pair_index"] = torch.tensor([r["pair_index"] for r in rows], dtype=torch.long)
        return batch


def answer_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: (sum of the log-probabilities of its trained tokens, how many there are).

    Token t is predicted by the logits at t-1, so the mask is read from position 1 on; untrained and padding
    positions contribute exactly 0. Computed in float32 whatever the model's dtype.
    """
    import torch.nn.functional as F

    targets = input_ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, -100)
    token_logps = -F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )  # [sequences, positions]; 0 where ignored
    return token_logps.sum(-1), (targets != -100).sum(-1)


def pair_terms(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    ref_logps: torch.Tensor,
    settings: DPOSettings,
) -> PairTerms:
    """The DPO terms of a micro-batch laid out by :class:`PairCollator` (2B sequences, chosen first).

    ``ref_logps`` (2B) are the reference's values in the same form the margin compares (sum, or mean with
    ``average_log_probs``). The SFT term is the chosen answer's NLL per token, whatever ``average_log_probs``.
    """
    import torch.nn.functional as F

    total, count = answer_logps(logits, input_ids, loss_mask)
    mean = total / count.clamp(min=1)
    logps = mean if settings.average_log_probs else total
    pairs = input_ids.shape[0] // 2
    logp_c, logp_r = logps[:pairs], logps[pairs:]
    reward_c = settings.beta * (logp_c - ref_logps[:pairs])
    reward_r = settings.beta * (logp_r - ref_logps[pairs:])
    loss = settings.preference_loss_weight * -F.logsigmoid(reward_c - reward_r)
    if settings.sft_loss_weight:
        loss = loss + settings.sft_loss_weight * -mean[:pairs]
    return PairTerms(loss, reward_c, reward_r, logp_c, logp_r)


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def attach_reference_logps(
    model,
    rows: list[dict[str, Any]],
    settings: DPOSettings,
    pad_id: int,
    batch_pairs: int,
    device=None,
    autocast_dtype=None,
) -> list[dict[str, Any]]:
    """``rows`` with ``ref_chosen_logp`` / ``ref_rejected_logp``: ``model`` (the frozen reference) scoring them.

    No gradients, eval mode, ``batch_pairs`` pairs per forward pass (rows of similar length together, so little
    padding). Under torch.distributed each process scores its share and all of them receive every value. The
    model's train/eval mode is restored afterwards: the same object is then trained as the policy.
    """
    import torch
    import torch.distributed as dist

    rank, world = _rank_and_world()
    mine = sorted(range(rank, len(rows), world), key=lambda i: len(rows[i]["chosen_input_ids"]))
    collate = PairCollator(pad_id)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    values: dict[int, tuple[float, float]] = {}
    try:
        with torch.no_grad():
            for start in range(0, len(mine), batch_pairs):
                chunk = mine[start : start + batch_pairs]
                batch = collate([rows[i] for i in chunk])
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
                with autocast:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                total, count = answer_logps(logits, ids, batch["loss_mask"].to(device))
                logps = (total / count.clamp(min=1) if settings.average_log_probs else total).tolist()
                for k, i in enumerate(chunk):
                    values[i] = (logps[k], logps[len(chunk) + k])
    finally:
        model.train(was_training)
    if world > 1:
        shares: list[dict[int, tuple[float, float]] | None] = [None] * world
        dist.all_gather_object(shares, values)
        values = {i: v for share in shares for i, v in (share or {}).items()}
    return [{**row, REFERENCE_FIELDS[0]: values[i][0], REFERENCE_FIELDS[1]: values[i][1]} for i, row in enumerate(rows)]


def make_dpo_trainer(settings: DPOSettings, **trainer_kwargs):
    """A :class:`transformers.Trainer` whose loss is DPO's (the class is built here: transformers loads lazily).

    Loss scaling, as transformers 5 does it (``Trainer.training_step`` / ``compute_loss`` /
    ``_get_num_items_in_batch``): it counts "items" only from a ``labels`` key, and only then hands
    ``num_items_in_batch`` over and skips its own division; ``average_tokens_across_devices`` multiplies by the
    number of processes only in its own ``compute_loss``, when it has such a count. Our batches carry no
    ``labels`` and ``model_accepts_loss_kwargs`` is off, so ``num_items_in_batch`` is None and the Trainer divides
    each micro-batch's loss by the micro-batches accumulated in the step; DDP then averages gradients over the
    processes. Every micro-batch holds exactly ``micro_batch_size`` pairs (``dataloader_drop_last``), so
    returning the mean over the micro-batch's pairs makes the step gradient the mean over the global batch's pairs.
    """
    import torch
    from transformers import Trainer

    class DPOTrainer(Trainer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dpo = settings
            self.model_accepts_loss_kwargs = False  # the scaling above; never token counts
            self._train_sums: torch.Tensor | None = None  # [len(STATS) + 1]: stat sums, then pairs, since the last log
            self._eval_records: list[torch.Tensor] = []  # [pairs, 2 + len(STATS)]: pair index, loss, stats

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Mean DPO loss over the micro-batch's pairs; records the pairs' statistics for logging."""
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            terms = pair_terms(outputs.logits, inputs["input_ids"], inputs["loss_mask"], inputs["ref_logps"], self.dpo)
            stats = terms.stats()
            if model.training:
                sums = torch.cat([stats.sum(0), stats.new_tensor([stats.shape[0]])]).double()
                self._train_sums = sums if self._train_sums is None else self._train_sums + sums
            else:
                cols = (inputs["pair_index"][:, None], terms.loss.detach()[:, None], stats)  # float64: exact indices
                self._eval_records.append(torch.cat([c.double() for c in cols], 1))
            loss = terms.loss.mean()
            return (loss, outputs) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            """Evaluation: the loss only (the Trainer's own step looks for ``labels``, which pairs do not have)."""
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

        def get_eval_dataloader(self, eval_dataset=None):
            """Every validation pair counts: ``dataloader_drop_last`` is for training's whole global batches."""
            drop, self.args.dataloader_drop_last = self.args.dataloader_drop_last, False
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.args.dataloader_drop_last = drop

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):  # fmt: skip
            """The Trainer's loop, then the loss and statistics as means over the distinct validation pairs."""
            self._eval_records = []
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)  # fmt: skip
            records = self._eval_records
            self._eval_records = []
            local = torch.cat(records).cpu() if records else torch.zeros((0, 2 + len(STATS)), dtype=torch.float64)
            world = _rank_and_world()[1]
            if world > 1:
                import torch.distributed as dist

                shares: list[torch.Tensor | None] = [None] * world
                dist.all_gather_object(shares, local)
                local = torch.cat([s for s in shares if s is not None])
            # Distributed evaluation pads the last batches with repeated pairs: each pair counts once.
            by_pair = {int(r[0]): r[1:] for r in local}
            if by_pair:
                means = torch.stack(list(by_pair.values())).mean(0).tolist()
                output.metrics[f"{metric_key_prefix}_loss"] = means[0]
                output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in zip(STATS, means[1:])})
            return output

        def log(self, logs, start_time=None):
            """A training log (it has ``loss``) gets the pairs' statistics since the previous one, over all processes.

            Every process logs at the same steps (the Trainer gathers the loss there), so the all-reduce is safe.
            """
            if "loss" in logs and self._train_sums is not None:
                sums = self._train_sums.to(self.args.device)
                if _rank_and_world()[1] > 1:
                    import torch.distributed as dist

                    dist.all_reduce(sums)
                sums = sums.cpu()
                logs.update({k: (sums[i] / sums[-1]).item() for i, k in enumerate(STATS)})
                self._train_sums = None
            super().log(logs, start_time)

    return DPOTrainer(**trainer_kwargs)


def train_dpo(
    cfg: AliaConfig,
    stage: ResolvedStage,
    train_rows: list[dict[str, Any]],
    val_rows: list[dict[str, Any]],
    tokenizer_dir: Path,
    output_dir: Path,
    use_cpu: bool = True,
    report_to: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a DPO stage with transformers' Trainer; the final model goes to ``output_dir/final``.

    Same contract as :func:`alia_nemo.engines.hf_training.train_sft`: alone or inside a Ray Train worker, the
    same arguments, checkpoints, metrics.jsonl, non-finite stop and final/; rows are preference pairs
    (``chosen_input_ids``, ``chosen_loss_mask``, ``rejected_input_ids``, ``rejected_loss_mask``). The reference
    log-probabilities come from the start model, scored before training, also on resume (it is deterministic:
    the pretrained weights or the seeded random init).
    """
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback

    assert cfg.stage.dpo is not None  # the schema fills in its defaults for every DPO stage
    check_pairs(train_rows, "training")
    check_pairs(val_rows, "validation")
    prepare_worker(cfg, output_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    args = training_arguments(cfg, stage, output_dir, use_cpu, ["tensorboard"] if report_to is None else report_to)
    model = build_model(cfg, stage).to(args.device)
    # pair_index: evaluation counts each pair once however distributed evaluation pads its batches.
    indexed = [{**r, "pair_index": i} for i, r in enumerate([*train_rows, *val_rows])]
    scored = attach_reference_logps(
        model,
        indexed,
        cfg.stage.dpo,
        tokenizer.pad_token_id,
        batch_pairs=args.per_device_eval_batch_size,
        device=args.device,
        autocast_dtype=torch.bfloat16 if args.bf16 else None,  # as the Trainer runs the policy
    )
    train_set = Dataset.from_list(scored[: len(train_rows)])
    val_set = Dataset.from_list(scored[len(train_rows) :]) if val_rows else None
    trainer = make_dpo_trainer(
        cfg.stage.dpo,
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set if args.eval_strategy != "no" else None,
        data_collator=PairCollator(tokenizer.pad_token_id),
        callbacks=[metrics_callback(output_dir / "metrics.jsonl", cfg.run.print_every, SHOWN)],
    )
    trainer.remove_callback(PrinterCallback)  # one dict per step drowns the console (and Ray's log stream)
    resume = resume_point(cfg, output_dir)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics = dict(result.metrics)
    if val_set is not None:  # the final validation loss and rewards, whatever the cadence during training
        metrics.update(final_evaluation(trainer, lambda: val_set))
    save_final(trainer, tokenizer, output_dir)
    metrics.update(run_metadata(trainer, resume))
    return metrics
