"""``engine=nemo_rl``: compile the stage and run NeMo-RL's entry points on Ray: ``sft.setup`` + ``sft_train`` for
SFT and CPT stages, ``dpo.setup`` + ``dpo_train`` for DPO stages.

Runs where NeMo-RL is importable (its container image, or the CPU harness in tests). Ray: the cluster at
``engine.ray_address`` or ``RAY_ADDRESS``, else a local one (NeMo-RL's ``init_ray``). Our package reaches
every Ray worker through ``PYTHONPATH``, which NeMo-RL forwards to its workers. Rerunning with the same
``run.output_dir`` resumes from NeMo-RL's newest checkpoint there (its CheckpointManager finds it).

Around NeMo-RL's loop the driver adds what a run of ours always has: ``metrics.jsonl`` and ``loss.png``
(from NeMo-RL's own logged metrics; DPO's preference accuracy and rewards too), a stop at the first non-finite loss,
a count of the conversations (DPO: pairs) NeMo-RL trained with zero loss because they were too long (counted as the
driver consumes batches, so dataloader worker processes do not hide them), and ``final/``: the newest checkpoint
converted to a Hugging Face directory by NeMo-RL's own converter, which is what the next stage of a pipeline starts
from.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from alia_nemo.config.schema import AliaConfig
from alia_nemo.engines import TrainingError, explain_failure, nonfinite_error
from alia_nemo.engines.run_dir import run_path
from alia_nemo.errors import ConfigError

CONFIG_NAME = "nemo_rl_sft.yaml"  # SFT and CPT stages (NeMo-RL's SFT loop)
DPO_CONFIG_NAME = "nemo_rl_dpo.yaml"
METRICS = "metrics.jsonl"
MASKED = "masked_overlong.jsonl"


def config_name(config: dict[str, Any]) -> str:
    """The compiled file's name in a run directory: ``nemo_rl_dpo.yaml`` for a DPO config, else ``nemo_rl_sft.yaml``."""
    return DPO_CONFIG_NAME if "dpo" in config else CONFIG_NAME


def require_nemo_rl() -> None:
    """Fail early, with the way out, where NeMo-RL is missing."""
    try:
        import nemo_rl  # noqa: F401
    except ImportError:
        raise ConfigError(
            "engine=nemo_rl needs NeMo-RL v0.7 (its container image, or its source on PYTHONPATH with its "
            "dependencies). Here, `alia-nemo compile ... --out FILE` writes the config to run there with "
            "examples/run_sft.py; engine=local trains on this machine."
        ) from None


def package_path_dir(output_dir: Path) -> Path:
    """A directory holding only ``alia_nemo`` (a link), safe to put on every worker's PYTHONPATH.

    Pointing PYTHONPATH at site-packages would leak the driver's packages into NeMo-RL's worker venvs.
    """
    import alia_nemo

    shim = output_dir / ".pythonpath"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "alia_nemo"
    target = Path(alia_nemo.__file__).resolve().parent
    if link.is_symlink() and link.resolve() != target:
        link.unlink()
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)
    return shim


def build_datasets(master_config: Any, tokenizer: Any) -> tuple[Any, Any]:
    """Our dataset class through NeMo-RL's own loader, wrapped as NeMo-RL processed datasets."""
    from nemo_rl.data.datasets import AllTaskProcessedDataset, load_response_dataset

    data = master_config.data
    raw = load_response_dataset(dict(data["train"]))
    processor = partial(
        raw.processor,
        add_bos=data["add_bos"],
        add_eos=data["add_eos"],
        add_generation_prompt=data["add_generation_prompt"],
    )
    processors = {raw.task_name: (raw.task_spec, processor)}
    max_len = data["max_input_seq_length"]
    train = AllTaskProcessedDataset(raw.dataset, tokenizer, None, processors, max_seq_length=max_len)
    val = None
    if raw.val_dataset is not None:
        val = AllTaskProcessedDataset(raw.val_dataset, tokenizer, None, processors, max_seq_length=max_len)
    return train, val


def build_preference_datasets(master_config: Any, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """Our preference pairs through NeMo-RL's ``load_preference_dataset`` (dotted path), with our processor.

    As NeMo-RL's ``setup_preference_data`` (upstream run_dpo.py) lays them out: ``data.train`` is the training set,
    ``data.validation`` (the held-out split, or null) the validation set ``{"default": ...}``; the only difference
    is the processor, ours (the entry's ``processor``) instead of NeMo-RL's ``preference_preprocessor``.
    """
    from nemo_rl.data.datasets import AllTaskProcessedDataset
    from nemo_rl.data.datasets.preference_datasets import load_preference_dataset

    data = master_config.data
    options = {k: data[k] for k in ("add_bos", "add_eos", "add_generation_prompt") if k in data}

    def processed(entry: dict[str, Any]) -> Any:
        raw = load_preference_dataset(dict(entry))
        raw.set_processor()  # NeMo-RL's preference loader binds none: our class registers and binds its own
        processors = {raw.task_name: (raw.task_spec, partial(raw.processor, **options))}
        return AllTaskProcessedDataset(raw.dataset, tokenizer, None, processors,
                                       max_seq_length=data["max_input_seq_length"])  # fmt: skip

    validation = data.get("validation")
    return processed(data["train"]), ({"default": processed(validation)} if validation else {})


def write_run_config(cfg: AliaConfig, output_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Compile the stage and write it (and our composed config) into the run directory."""
    from alia_nemo.config.to_nemo_rl import header
    from alia_nemo.engines.nemo_rl_prepare import compile_stage

    compiled = compile_stage(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / config_name(compiled.config)
    text = header(cfg, compiled, "alia-nemo train engine=nemo_rl") + yaml.safe_dump(compiled.config, sort_keys=False)
    path.write_text(text)
    (output_dir / "alia_config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    return path, compiled.config


class MetricsRecorder:
    """A NeMo-RL logger backend: train and validation losses to ``metrics.jsonl`` (the local engine's format).

    SFT's loop logs ``train`` and ``validation`` (``val_loss``); DPO's logs ``train`` and ``validation-<set>``
    (``loss``), both with the DPO loss's ``accuracy``, ``rewards_chosen_mean`` and ``rewards_rejected_mean``. Those
    become ``rewards/accuracy``, ``rewards/chosen``, ``rewards/rejected`` and ``rewards/margin`` (chosen - rejected),
    ``eval_``-prefixed for the validation set ``default``. NeMo-RL's rewards are the policy-to-reference log-ratios;
    they are written times ``reward_scale`` (DPO's beta), the implicit reward the local engine (and TRL) log, so
    ``rewards/margin`` means the same whichever engine trained.

    Raises :class:`TrainingError` at the first non-finite training or validation loss, which ends ``sft_train`` /
    ``dpo_train`` there (NeMo-RL logs a step after saving its checkpoint).

    With ``print_every`` (``run.print_every``) and ``total_steps`` it also prints the local engine's progress line
    every ``print_every`` steps (and at the first and last): step of total, loss (DPO: margin and accuracy too),
    learning rate, tokens per second (NeMo-RL's ``global_valid_toks``: the trained tokens of each step) and the time
    left, measured from ``start_step`` (the checkpoint this attempt resumed from) on.
    """

    def __init__(
        self, path: Path, reward_scale: float = 1.0, total_steps: int | None = None, print_every: int = 0,
        start_step: int = 0,
    ) -> None:  # fmt: skip
        from alia_nemo.engines.progress import Progress

        self.path = Path(path)
        self.reward_scale = reward_scale
        self.total_steps = total_steps
        self.print_every = print_every
        self.progress = Progress(total_steps) if total_steps and print_every else None
        self._tokens = 0.0  # trained tokens of this attempt
        if self.progress is not None:
            self.progress.begin(start_step)

    def _rewards(self, metrics: dict[str, Any], tag: str) -> dict[str, float]:
        if "rewards_chosen_mean" not in metrics:
            return {}
        chosen = self.reward_scale * float(metrics["rewards_chosen_mean"])
        rejected = self.reward_scale * float(metrics["rewards_rejected_mean"])
        return {
            f"{tag}rewards/accuracy": float(metrics["accuracy"]),
            f"{tag}rewards/chosen": chosen,
            f"{tag}rewards/rejected": rejected,
            f"{tag}rewards/margin": chosen - rejected,
        }

    def log_metrics(
        self, metrics: dict[str, Any], step: int, prefix: str | None = "", step_metric: Any = None,
        step_finished: bool = False,
    ) -> None:  # fmt: skip
        if prefix == "train" and "loss" in metrics:
            loss_key = "loss"
            row = {"step": step, "loss": float(metrics["loss"])}
            for ours, theirs in (("grad_norm", "grad_norm"), ("learning_rate", "lr"), ("tokens", "global_valid_toks")):
                if theirs in metrics:
                    row[ours] = float(metrics[theirs])
            row.update(self._rewards(metrics, ""))
        elif prefix == "validation" and "val_loss" in metrics:
            loss_key = "eval_loss"
            row = {"step": step, "eval_loss": float(metrics["val_loss"])}
        elif prefix and prefix.startswith("validation-") and "loss" in metrics:  # DPO: one prefix per validation set
            name = prefix.removeprefix("validation-")
            tag = "eval_" if name == "default" else f"eval_{name}_"
            loss_key = f"{tag}loss"
            row = {"step": step, loss_key: float(metrics["loss"]), **self._rewards(metrics, tag)}
        else:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        loss = row[loss_key]
        if not math.isfinite(loss):
            what = "training loss" if loss_key == "loss" else "validation loss"
            raise nonfinite_error(self.path.parent, what, loss, step)
        if self.progress is not None:
            self._print(row, loss_key, step)

    def _print(self, row: dict[str, Any], loss_key: str, step: int) -> None:
        """The progress line of a training row (every ``print_every`` steps), or the validation line."""
        tag = loss_key.removesuffix("loss")  # "", "eval_" or "eval_<set>_": where a DPO row keeps its rewards
        keys = {label: f"{tag}rewards/{label}" for label in ("margin", "accuracy")}
        extra = "".join(f" {label} {row[key]:.4f}" for label, key in keys.items() if key in row)
        if loss_key != "loss":
            where = "" if loss_key == "eval_loss" else f" ({loss_key.removeprefix('eval_').removesuffix('_loss')})"
            print(f"[alia-nemo] step {step} validation{where} loss {row[loss_key]:.4f}{extra}", flush=True)
            return
        self._tokens += row.get("tokens", 0.0)
        if step % self.print_every == 0 or step in (1, self.total_steps):
            rates = self.progress.suffix(step, self._tokens or None)
            print(f"[alia-nemo] step {step}/{self.total_steps} loss {row['loss']:.4f}{extra} "
                  f"lr {row.get('learning_rate', 0):.3g}{rates}", flush=True)  # fmt: skip

    def log_hyperparams(self, params: Any) -> None:
        pass

    def log_histogram(self, histogram: Any, step: int, name: str) -> None:
        pass

    def log_plot(self, figure: Any, step: int, name: str) -> None:
        pass


class MaskedRows:
    """A NeMo-RL dataloader, seen through: records every row a consumed batch carries with zero loss weight.

    Our processors give over-long conversations ``loss_multiplier`` 0; batches are read here, in the driver,
    so rows processed in dataloader worker processes are counted too. Rows go to a JSONL file (the run's
    record across restarts); everything else is the wrapped loader's.
    """

    def __init__(self, loader: Any, split: str, rows: Any, path: Path) -> None:
        self._loader, self._split, self._rows, self._path = loader, split, rows, Path(path)

    def __iter__(self) -> Iterator[Any]:
        for batch in self._loader:
            weights = batch["loss_multiplier"].tolist()
            masked = [int(i) for i, w in zip(batch["idx"], weights) if w == 0]
            if masked:
                with self._path.open("a") as f:
                    for i in masked:
                        row = {"split": self._split, "idx": i, "id": str(self._rows[i].get("id", i))}
                        f.write(json.dumps(row) + "\n")
            yield batch

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class MaskedPairs:
    """:class:`MaskedRows` for DPO batches: counts the pairs a consumed batch carries with zero loss weight.

    NeMo-RL's ``preference_collate_fn`` keeps only ``input_ids``, ``input_lengths``, ``token_mask`` and
    ``sample_mask`` (chosen and rejected interleaved), so a batch does not say which pairs it holds: the count is of
    pairs as consumed (a pair masked in two epochs counts twice); the processor names each one on stderr.
    """

    def __init__(self, loader: Any, split: str, path: Path) -> None:
        self._loader, self._split, self._path = loader, split, Path(path)

    def __iter__(self) -> Iterator[Any]:
        for batch in self._loader:
            masked = sum(1 for w in batch["sample_mask"][::2].tolist() if w == 0)
            if masked:
                with self._path.open("a") as f:
                    f.write(json.dumps({"split": self._split, "pairs": masked}) + "\n")
            yield batch

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def masked_report(path: Path, dpo: bool = False) -> dict[str, Any]:
    """Distinct conversations trained with zero loss, per split, from the run's record (DPO: pairs, as consumed)."""
    if dpo:
        pairs = {"train": 0, "validation": 0}
        if Path(path).is_file():
            for line in Path(path).read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    pairs[row["split"]] = pairs.get(row["split"], 0) + row["pairs"]
        return {split: {"pairs": n} for split, n in pairs.items()}
    seen: dict[str, set[str]] = {"train": set(), "validation": set()}
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                seen.setdefault(row["split"], set()).add(row["id"])
    return {split: {"conversations": len(ids), "ids": sorted(ids)} for split, ids in seen.items()}


def _training_info(step_dir: str | Path | None) -> dict[str, Any]:
    if step_dir is None:
        return {}
    return json.loads((Path(step_dir) / "training_info.json").read_text())


def _print_every(output_dir: Path) -> int:
    """``run.print_every`` of the run's composed config (``alia_config.json``); 0 (no progress lines) without one."""
    try:
        return int(json.loads((Path(output_dir) / "alia_config.json").read_text())["run"]["print_every"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def connect_ray(master: Any, ray_address: str | None = None) -> None:
    """NeMo-RL's ``init_ray`` on ``ray_address`` / ``RAY_ADDRESS`` (else a local cluster), GPUs checked."""
    import ray
    from nemo_rl.distributed.virtual_cluster import init_ray

    if ray_address:
        os.environ["RAY_ADDRESS"] = ray_address
    # Inside a Ray job (alia-nemo submit) the job has its own runtime env; init_ray passes the whole
    # environment as another one, and Ray refuses to merge the two unless told to (as NeMo-RL's image does).
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    init_ray()
    need = master.cluster["num_nodes"] * master.cluster["gpus_per_node"]
    have = int(ray.cluster_resources().get("GPU", 0))
    if have < need:  # NeMo-RL would retry for a minute, then fail less clearly
        ray.shutdown()
        raise ConfigError(
            f"the Ray cluster has {have} GPUs and this run needs {need} (cluster.num_nodes x cluster.gpus_per_node); "
            "point engine.ray_address or RAY_ADDRESS at a cluster that has them, or pick a smaller cluster= profile"
        )


def set_aside_broken_checkpoints(checkpoint_dir: Path, output_dir: Path) -> None:
    """Move NeMo-RL ``step_N`` checkpoints that would not load, newest first, out of its way.

    NeMo-RL resumes from the highest ``step_N`` whatever its state; a torn one (full disk, killed mid-write,
    truncated copy) crashes the resume. They go to ``output_dir/incomplete-checkpoints/`` (kept, never
    deleted), so NeMo-RL resumes from the newest sound one.
    """
    import re
    import time

    from alia_nemo.model.checkpoints import checkpoint_problem

    steps = [p for p in checkpoint_dir.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and p.is_dir()]
    for step in sorted(steps, key=lambda p: int(p.name.split("_")[1]), reverse=True):
        problem = checkpoint_problem(step)
        if problem is None:
            return
        aside = output_dir / "incomplete-checkpoints" / f"{step.name}-{time.strftime('%Y%m%dT%H%M%S')}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        step.rename(aside)
        print(f"[alia-nemo] checkpoint {step} is incomplete ({problem}); moved it to {aside} and resume from "
              "the previous one", flush=True)  # fmt: skip


def train_compiled(
    config: dict[str, Any], output_dir: Path, ray_address: str | None = None, title: str = ""
) -> dict[str, Any]:
    """Run NeMo-RL's loop on a compiled config; return the run's summary (also in ``summary.json``).

    Connects to Ray (:func:`connect_ray`), builds tokenizer and data through NeMo-RL's loaders, calls its
    ``setup()`` and ``sft_train()`` (a DPO config: ``nemo_rl.algorithms.dpo``'s ``setup()`` and ``dpo_train()``,
    whose policy keeps the start model as the frozen reference), releases the workers and their GPUs, then writes
    ``final/`` from the newest checkpoint. A rerun resumes from that checkpoint (NeMo-RL's CheckpointManager).
    """
    import ray
    from nemo_rl.algorithms.utils import get_tokenizer
    from nemo_rl.utils.logger import get_next_experiment_dir

    dpo = "dpo" in config
    if dpo:
        from nemo_rl.algorithms.dpo import MasterConfig, setup
        from nemo_rl.algorithms.dpo import dpo_train as train_loop
    else:
        from nemo_rl.algorithms.sft import MasterConfig, setup
        from nemo_rl.algorithms.sft import sft_train as train_loop

    out = Path(output_dir)
    # NeMo-RL forwards the driver's environment, PYTHONPATH included, to every worker it starts.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    shim = str(package_path_dir(out))
    os.environ["PYTHONPATH"] = os.pathsep.join([shim, *(p for p in paths if p != shim)])
    master = MasterConfig(**config)
    set_aside_broken_checkpoints(Path(master.checkpointing["checkpoint_dir"]), out)
    master.logger["log_dir"] = get_next_experiment_dir(master.logger["log_dir"])
    connect_ray(master, ray_address)
    tokenizer = get_tokenizer(master.policy["tokenizer"])
    if dpo:
        train, val_sets = build_preference_datasets(master, tokenizer)
        val = val_sets.get("default")
    else:
        train, val = build_datasets(master, tokenizer)
    (policy, cluster, train_loader, val_loader, loss_fn, logger, checkpointer, state, master) = setup(
        master, tokenizer, train, val_sets if dpo else val
    )
    resumed = checkpointer.get_latest_checkpoint_path()
    start = _training_info(resumed)  # now: keep_checkpoints may delete that checkpoint while training goes on
    total = config["dpo" if dpo else "sft"]["max_num_steps"]
    if resumed:
        print(f"[alia-nemo] resuming from {resumed} (step {start['total_steps']} of {total}): "
              f"{start['consumed_samples']} samples consumed", flush=True)  # fmt: skip
    reward_scale = master.dpo.reference_policy_kl_penalty if dpo else 1.0
    recorder = MetricsRecorder(out / METRICS, reward_scale, total, _print_every(out), start.get("total_steps", 0))
    logger.loggers.append(recorder)
    if dpo:  # DPO's validation loaders are one per set: {"default": loader}
        train_loader = MaskedPairs(train_loader, "train", out / MASKED)
        val_loader = {k: MaskedPairs(v, "validation", out / MASKED) for k, v in val_loader.items()}
    else:
        train_loader = MaskedRows(train_loader, "train", train.dataset, out / MASKED)
        if val_loader is not None:
            val_loader = MaskedRows(val_loader, "validation", val.dataset, out / MASKED)
    try:
        train_loop(policy, train_loader, val_loader, tokenizer, loss_fn, master, logger, checkpointer, state)
    except Exception as exc:  # a worker's own error (a full disk while checkpointing), not Ray's wrapper
        cause = explain_failure(exc, out)
        if cause is exc:
            raise
        raise cause from exc
    finally:
        # Free the workers and their GPU bundles: the next stage of a pipeline runs in this process.
        policy.shutdown()
        cluster.shutdown()
        ray.shutdown()
    report = {
        "data_path": master.data["train"]["data_path"],
        "train_rows": len(train),
        "val_rows": len(val) if val is not None else 0,
        "max_input_seq_length": master.data["max_input_seq_length"],
        "masked_overlong": masked_report(out / MASKED, dpo),
    }
    (out / "data_report.json").write_text(json.dumps(report, indent=2))
    for split, m in report["masked_overlong"].items():
        if m.get("conversations"):
            print(f"[alia-nemo] {m['conversations']} {split} conversations were longer than "
                  f"max_input_seq_length={report['max_input_seq_length']} and trained with zero loss "
                  f"(ids in {out / 'data_report.json'})", flush=True)  # fmt: skip
        if m.get("pairs"):
            print(f"[alia-nemo] {m['pairs']} {split} preference pairs (counted as consumed) were longer than "
                  f"max_input_seq_length={report['max_input_seq_length']} and trained with zero loss (their ids "
                  "are in the log, from the processor)", flush=True)  # fmt: skip
    newest = checkpointer.get_latest_checkpoint_path()
    return _summary(out, master, report, resumed, start, newest, title, config_name(config))


def _summary(
    out: Path, master: Any, report: dict[str, Any], resumed: str | None, start: dict[str, Any], newest: str | None,
    title: str, config_file: str = CONFIG_NAME,
) -> dict[str, Any]:  # fmt: skip
    """``final/`` written, the loss plotted, and the run's summary (the local engine's shape) saved."""
    from alia_nemo.plots import plot_loss, read_metrics

    end = _training_info(newest)
    rows = read_metrics(out / METRICS)
    train = {
        "global_step": end.get("total_steps"),
        "consumed_samples": end.get("consumed_samples"),
        "resumed_from": Path(resumed).name if resumed else None,
        "start_step": start.get("total_steps", 0),
        "start_consumed_samples": start.get("consumed_samples", 0),
        "checkpoint": newest,
    }
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    if losses:
        train["first_loss"], train["last_loss"] = losses[0], losses[-1]
    if evals:
        train["eval_loss"] = evals[-1]
    for key in ("rewards/accuracy", "rewards/margin", "eval_rewards/accuracy", "eval_rewards/margin"):
        values = [r[key] for r in rows if key in r]  # DPO runs: where the preference went, first and last
        if values:
            train[f"first_{key}"], train[f"last_{key}"] = values[0], values[-1]
    summary = {
        "output_dir": str(out),
        "final_model": str(write_final(out)),
        "loss_plot": str(plot_loss(out / METRICS, out / "loss.png", title=title)),
        "config": str(out / config_file),
        "checkpoints": master.checkpointing["checkpoint_dir"],
        "log_dir": master.logger["log_dir"],
        "data": report,
        "masked_overlong": {
            split: m.get("conversations", m.get("pairs")) for split, m in report["masked_overlong"].items()
        },
        "train": train,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_final(output_dir: Path) -> Path:
    """``final/``: the newest checkpoint as a Hugging Face directory (kept when it already holds that step)."""
    from alia_nemo.model.export import EXPORT_INFO, export, nemo_rl_checkpoint

    weights = nemo_rl_checkpoint(output_dir / "checkpoints")
    if weights is None:
        raise TrainingError(f"NeMo-RL wrote no checkpoint under {output_dir / 'checkpoints'}; nothing to export")
    step_dir = weights.parents[1]
    final = output_dir / "final"
    info = final / EXPORT_INFO
    if info.is_file() and json.loads(info.read_text()).get("source") == str(step_dir):
        return final
    return export(step_dir, final, force=True)  # replaces only our own earlier final/ (marked by export)


def run_nemo_rl(cfg: AliaConfig) -> dict[str, Any]:
    """Compile, connect to Ray, build tokenizer and data, train with NeMo-RL, write ``final/``."""
    require_nemo_rl()
    out = run_path(cfg)  # locked, and checked against resuming under another configuration, by run_dir.open_run
    _, config = write_run_config(cfg, out)
    title = f"{cfg.stage.name} / {cfg.model.arch} (NeMo-RL)"
    return train_compiled(config, out, getattr(cfg.engine, "ray_address", None), title)
