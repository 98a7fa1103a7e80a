"""One resolution of a validated config (plus its prepared data's manifest) into every number a stage derives.

World and data-parallel size, global batch (a CPT stage's from its token targets), gradient accumulation,
longest sequence kept, training and validation rows, steps, tokens per step and per run, the validation period,
the starting model and the RoPE keys the stage writes into it. ``show``, ``plan``, ``prepare``, ``compile``, both
engines and the pipeline read a :class:`ResolvedStage`; none of them recomputes these, so they can not disagree.

It is pure: it reads the config and, when given, the manifest of the prepared data (or the local engine's
data report); it reads no file and writes nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from alia_nemo.config.planner import data_parallel_size, sequence_divisor
from alia_nemo.config.schema import AUTO_VALIDATIONS, AliaConfig
from alia_nemo.errors import ConfigError
from alia_nemo.model.architectures import get_spec


@dataclass(frozen=True)
class ResolvedStage:
    """The derived numbers of one stage; ``None`` where they need data that has not been read yet."""

    kind: str  # sft | cpt
    unit: str  # what a row is: conversations (SFT) or windows (CPT)
    engine: str
    world: int  # training processes: local workers, or GPUs
    layout: dict[str, int]  # tp, pp, cp, dp
    global_batch_size: int
    micro_batch_size: int
    grad_accumulation: int  # micro-batches each data-parallel rank accumulates per step
    seq_length: int
    max_tokens: int  # longest conversation kept (SFT); the window length (CPT)
    sequence_divisor: int  # sequences are padded to a multiple of this (2 x CP x TP with CP, else TP)
    train_rows: int | None
    val_rows: int
    counted_from: str
    steps_per_epoch: int | None
    steps: int | None  # optimizer steps the run takes
    tokens_per_step: int  # global batch x seq_length (an upper bound for unpacked SFT)
    tokens: int | None  # tokens per run: steps x tokens_per_step
    train_tokens: int | None  # CPT: training tokens to pack (data.max_tokens, else every step's windows)
    start_model: str  # model.pretrained, or "random init (<arch>)"
    hf_overrides: dict[str, Any] = field(default_factory=dict)  # RoPE keys the stage sets on its starting model
    cpt: dict[str, Any] | None = None  # how a CPT global batch and step count came from the token targets
    # Validation every this many steps, and at the end (0: only at the end, or no validation rows; None: auto, with
    # the steps unknown until the data is read). Both engines read it: the Trainer's eval_steps, NeMo-RL's val_period.
    eval_every: int | None = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_trainable(self) -> None:
        """Raise :class:`ConfigError` unless the stage takes at least one whole step (engines, compile)."""
        if self.train_rows is not None and self.train_rows < self.global_batch_size:
            raise ConfigError(
                f"{self.train_rows:,} training {self.unit} ({self.counted_from}) do not fill one global batch of "
                f"{self.global_batch_size}; lower stage.global_batch_size or use more data"
            )
        if not self.steps:
            raise ConfigError("the stage has no step count: set stage.max_steps (CPT: stage.token_budget)")


def validation_count(rows: int, fraction: float) -> int:
    """Validation rows held out of ``rows`` at ``fraction``: ceil, so any positive fraction holds out one."""
    return math.ceil(rows * fraction) if fraction > 0 and rows > 0 else 0


def eval_period(setting: int | str | None, steps: int | None, val_rows: int) -> int | None:
    """Steps between validations for ``run.eval_every`` (0: none before the end; None: auto with steps unknown).

    ``auto`` spreads about :data:`AUTO_VALIDATIONS` validations over the run, so a 4-step run validates every step and
    the default job's 204 steps every 21: a curve at every scale, without a number per stage or recipe.
    """
    if not val_rows or setting is None:
        return 0
    if setting != "auto":
        return int(setting)
    return max(1, math.ceil(steps / AUTO_VALIDATIONS)) if steps is not None else None


def steps_for_tokens(tokens: int, global_batch: int, seq_length: int) -> int:
    """Steps that train at least ``tokens`` tokens in full windows (overshooting by less than one step)."""
    return -(-tokens // (global_batch * seq_length))


def _layout(cfg: AliaConfig) -> tuple[int, dict[str, int]]:
    eng = cfg.engine
    if eng.name == "local":
        return eng.num_workers, {"tp": 1, "pp": 1, "cp": 1, "dp": eng.num_workers}
    world = cfg.cluster.num_nodes * cfg.cluster.gpus_per_node
    tp, pp, cp = eng.tensor_parallel, eng.pipeline_parallel, eng.context_parallel
    if world and world % (tp * pp * cp):
        raise ConfigError(
            f"cluster {cfg.cluster.name} has {world} GPUs, not a multiple of TP x PP x CP = {tp * pp * cp}; change "
            "engine.tensor_parallel / pipeline_parallel / context_parallel or cluster.num_nodes / gpus_per_node"
        )
    return world, {"tp": tp, "pp": pp, "cp": cp, "dp": data_parallel_size(world, tp, pp, cp)}


def _cpt_batch(cfg: AliaConfig, dp: int) -> tuple[int, int | None, dict[str, Any]]:
    """(global batch, step cap, how) of a CPT stage from ``tokens_per_update`` and ``token_budget``.

    The global batch is tokens_per_update / seq_length rounded to the nearest multiple of DP x micro-batch (at
    least one), so every rank gets whole micro-batches; an explicit ``stage.global_batch_size`` wins. Steps:
    ceil(token_budget / tokens per step); an explicit ``stage.max_steps`` wins.
    """
    s = cfg.stage
    unit = dp * s.micro_batch_size
    if s.global_batch_size is not None:
        gbs = s.global_batch_size
    else:
        assert s.tokens_per_update is not None  # the schema requires one of the two
        gbs = max(unit, round(s.tokens_per_update / s.seq_length / unit) * unit)
    budget_steps = steps_for_tokens(s.token_budget, gbs, s.seq_length) if s.token_budget else None
    how = {
        "tokens_per_update_target": s.tokens_per_update,
        "rounded_to_multiple_of": unit,
        "token_budget": s.token_budget,
        "budget_steps": budget_steps,
    }
    return gbs, s.max_steps or budget_steps, how


def _rope_overrides(cfg: AliaConfig) -> dict[str, Any]:
    # transformers 5.x reads rope_parameters (rope_theta lives inside it); a bare rope_theta is ignored.
    rope = cfg.stage.rope.settings()
    if rope.type == "none":
        return {}
    return {
        "max_position_embeddings": cfg.stage.seq_length,
        "rope_parameters": rope.hf_rope_parameters(get_spec(cfg.model.arch).rope_theta),
    }


def resolve(cfg: AliaConfig, manifest: dict[str, Any] | None = None) -> ResolvedStage:
    """Every derived number of ``cfg``'s stage; rows and steps from ``manifest`` when the data is prepared.

    Without a manifest the rows are what the config asks for (a mixture's counts, a corpus' token budget) or
    unknown (plain JSONL, read only at train time). Raises :class:`ConfigError` for a layout or batch that
    does not divide; :meth:`ResolvedStage.check_trainable` is what refuses data that fills no global batch.
    """
    from alia_nemo.data.sources import source_for

    s = cfg.stage
    world, layout = _layout(cfg)
    dp = layout["dp"]
    step_cap, cpt = s.max_steps, None
    if s.kind == "cpt":
        gbs, step_cap, cpt = _cpt_batch(cfg, dp)
    else:
        assert s.global_batch_size is not None  # the schema requires it for SFT
        gbs = s.global_batch_size
    if gbs % (s.micro_batch_size * dp):
        raise ConfigError(
            f"stage.global_batch_size={gbs} is not a multiple of stage.micro_batch_size x data-parallel size "
            f"({s.micro_batch_size} x {dp} = {s.micro_batch_size * dp}); change one of them"
        )
    tokens_per_step = gbs * s.seq_length
    source = source_for(cfg.data)
    train_tokens = None
    if s.kind == "cpt":
        train_tokens = source.train_tokens(cfg, step_cap, tokens_per_step)
    counts = source.count(cfg, manifest, train_tokens)
    steps_per_epoch = steps = None
    if counts.train is not None:
        steps_per_epoch = counts.train // gbs  # the last partial batch is dropped (as NeMo-RL's loader does)
        steps = steps_per_epoch * s.epochs
    if step_cap:
        steps = min(steps, step_cap) if steps is not None else step_cap
    return ResolvedStage(
        kind=s.kind,
        unit=source.unit,
        engine=cfg.engine.name,
        world=world,
        layout=layout,
        global_batch_size=gbs,
        micro_batch_size=s.micro_batch_size,
        grad_accumulation=gbs // (s.micro_batch_size * dp),
        seq_length=s.seq_length,
        max_tokens=source.max_tokens(cfg),
        sequence_divisor=sequence_divisor(layout["tp"], layout["cp"]),
        train_rows=counts.train,
        val_rows=counts.val,
        counted_from=counts.counted_from,
        steps_per_epoch=steps_per_epoch,
        steps=steps,
        tokens_per_step=tokens_per_step,
        tokens=steps * tokens_per_step if steps else None,
        train_tokens=train_tokens,
        start_model=cfg.model.pretrained or f"random init ({cfg.model.arch})",
        hf_overrides=_rope_overrides(cfg),
        cpt=cpt,
        eval_every=eval_period(cfg.run.eval_every, steps, counts.val),
    )


def describe(cfg: AliaConfig, r: ResolvedStage) -> str:
    """The resolved numbers as YAML comments (what ``show`` appends to the config)."""
    lay = r.layout
    lines = [
        f"world {r.world} ({'workers' if r.engine == 'local' else 'GPUs'}): TP{lay['tp']} PP{lay['pp']} "
        f"CP{lay['cp']} DP{lay['dp']}, {r.grad_accumulation} micro-batches of {r.micro_batch_size} accumulated",
    ]
    if r.cpt:
        target = r.cpt["tokens_per_update_target"]
        how = f"{target:,} tokens/update / {r.seq_length:,}" if target else "set explicitly"
        lines.append(
            f"global batch {r.global_batch_size} windows ({how}, rounded to the nearest multiple of DP {lay['dp']} "
            f"x micro-batch {r.micro_batch_size} = {r.cpt['rounded_to_multiple_of']})"
        )
    else:
        lines.append(f"global batch {r.global_batch_size} {r.unit}, longest kept {r.max_tokens:,} tokens")
    lines.append(f"tokens per update {r.tokens_per_step:,}")
    rows = "unknown until the data is read" if r.train_rows is None else f"{r.train_rows:,}"
    lines.append(f"training {r.unit} {rows}, validation {r.val_rows:,} ({r.counted_from})")
    if r.steps is not None:
        budget = r.cpt and r.cpt["token_budget"]
        lines.append(
            f"steps {r.steps:,}"
            + (f" = ceil({budget:,} budget / {r.tokens_per_step:,})" if budget and r.steps == r.cpt["budget_steps"]
               else f" ({r.steps_per_epoch:,} per epoch x {cfg.stage.epochs})" if r.steps_per_epoch else "")
        )  # fmt: skip
        lines.append(f"tokens trained {r.tokens or 0:,}")
        if not r.steps:  # the data fills no global batch: say so here, train and compile refuse it
            lines.append(f"NOT TRAINABLE: {r.train_rows:,} {r.unit} do not fill one global batch of "
                         f"{r.global_batch_size}; lower stage.global_batch_size or use more data")  # fmt: skip
    else:
        lines.append("steps: unknown until the data is read (plain JSONL), or unbounded (no budget, no max_steps)")
    lines.append(f"start model {r.start_model}")
    lines.append(_validation_line(cfg, r))
    return "# derived:\n" + "".join(f"#   {line}\n" for line in lines)


def _validation_line(cfg: AliaConfig, r: ResolvedStage) -> str:
    """How often the stage validates, and why (``run.eval_every`` as set, or what ``auto`` made of the steps)."""
    setting = cfg.run.eval_every
    if not r.val_rows:
        return "validation: none (no validation rows)"
    if r.eval_every is None:
        return (
            f"validation about {AUTO_VALIDATIONS} times per run (run.eval_every=auto; steps unknown until data is read)"
        )
    if not r.eval_every:
        return "validation at the end only (run.eval_every=null)"
    points = -(-(r.steps or 0) // r.eval_every)  # the last periodic one and the final one coincide on a multiple
    why = f"auto: about {AUTO_VALIDATIONS} per run" if setting == "auto" else "set"
    every = "step" if r.eval_every == 1 else f"{r.eval_every:,} steps"
    return f"validation every {every} and at the end: {points:,} points (run.eval_every {why})"
