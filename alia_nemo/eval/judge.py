"""LLM-as-a-judge as the ALIA-40b-instruct card describes it.

A task (``conf/eval/judge/*.yaml``, a :class:`JudgeTask`) names a source dataset, the column holding each
instance's question, three prompt styles per language and the criteria a judge grades with. For every language
N instances are sampled (seeded; the card uses 250), each is shown to the model under test inside each of the
three styles, and Prometheus-2 grades every answer against every criterion with the card's absolute-grading
prompt (:data:`alia_nemo.eval.niah.JUDGE_PROMPT`), without a reference answer. Criteria and the judge prompt stay
in English for all languages (card); only the styles are translated.

Reported per language and criterion (``judge.json``, ``judge.png``):

* ``mean``: the mean of the judge's valid scores over all (instance, style) answers;
* ``robustness_variance``: for each instance, the population variance of its valid scores across the three
  styles (over the styles that got a valid score); then the mean of that over instances. Instances with fewer
  than two valid scores have no variance and are left out (``robustness_excluded`` counts them). 0 means the
  judge scored every style of every instance alike;
* ``unparseable``: judgements without a usable score, per reason (``no [RESULT]``, ``out of range``); they are
  excluded from both numbers above, never silently dropped.

Every finished (instance, style) is kept in ``judge_results.jsonl`` as it finishes (the model's answer as soon
as it arrives, the judgements when they are all in), so a rerun with the same settings continues where a killed
or failed run stopped and never asks the model for an answer it already has.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alia_nemo.errors import ConfigError
from alia_nemo.eval.niah import (
    JUDGE_PROMPT,
    RETRIES,
    TIMEOUT_S,
    EndpointError,
    OpenAIBackend,
    TransformersBackend,
    settings_digest,
)

RESULTS = "judge_results.jsonl"
DEFAULT_JUDGE = "prometheus-eval/prometheus-8x7b-v2.0"
DEFAULT_INSTANCES = 250  # the card: "a subset of 250 instances per language"
NO_RESULT, OUT_OF_RANGE = "no [RESULT]", "out of range"
ROBUSTNESS_DEFINITION = (
    "mean over instances of the population variance of the judge's valid scores across the prompt styles (over "
    "the styles with a valid score); instances with fewer than 2 valid scores are left out (robustness_excluded)"
)
# Prometheus ends its feedback with "[RESULT] n"; an integer not followed by a decimal part ("4.5" is no score).
_RESULT = re.compile(r"\[RESULT\]\s*(-?\d+)(?![\d.]*\d)")


# ------------------------------------------------------------------------------------------------ tasks


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """Where the instances come from: a hub dataset (one config per language) and/or local files per language."""

    hub: str | None = None
    configs: dict[str, str] = Field(default_factory=dict)  # language -> hub config name that holds it
    files: dict[str, str] = Field(default_factory=dict)  # language -> local .jsonl/.parquet (win over the hub)
    split: str = "test"


class Fields(_Strict):
    """Which columns hold the instruction (question) and the instance id (None: the row index)."""

    instruction: str
    id: str | None = None


class Criterion(_Strict):
    """One rubric the judge scores with, on a Likert 1-5 or a binary 0-1 scale."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    rubric: str = Field(min_length=1)
    min_score: int
    max_score: int

    @model_validator(mode="after")
    def _scale(self) -> Criterion:
        if (self.min_score, self.max_score) not in ((1, 5), (0, 1)):
            raise ValueError(f"scale {self.min_score}-{self.max_score}: use 1-5 (Likert) or 0-1 (binary)")
        return self


class JudgeTask(_Strict):
    """A judge task as data (``conf/eval/judge/NAME.yaml``); unknown keys are refused.

    ``styles`` maps each language to exactly three ``[prefix, suffix]`` pairs, or to null where the human
    translations are still to be filled in.
    """

    name: str
    description: str = ""
    source: Source
    fields: Fields
    styles: dict[str, list[tuple[str, str]] | None]
    criteria: list[Criterion] = Field(min_length=1)

    @field_validator("styles")
    @classmethod
    def _three(cls, styles: dict[str, list[tuple[str, str]] | None]) -> dict[str, list[tuple[str, str]] | None]:
        for lang, pairs in styles.items():
            if pairs is not None and len(pairs) != 3:
                raise ValueError(f"styles.{lang} has {len(pairs)} [prefix, suffix] pairs; the card uses exactly 3")
        return styles

    @model_validator(mode="after")
    def _sources(self) -> JudgeTask:
        names = [c.name for c in self.criteria]
        if len(set(names)) != len(names):
            raise ValueError(f"criteria names repeat: {names}")
        if not self.source.hub and not self.source.files:
            raise ValueError("source needs a hub dataset id (source.hub) or local files per language (source.files)")
        return self


def task_path(task: str) -> Path:
    """A task's YAML: a path to a file, or a name under ``conf/eval/judge/``."""
    if task.endswith((".yaml", ".yml")) or os.sep in task:
        return Path(task)
    from alia_nemo.config.compose import config_root

    return config_root() / "conf" / "eval" / "judge" / f"{task}.yaml"


def load_task(task: str) -> tuple[JudgeTask, Path]:
    """The validated task and the file it came from; every problem is a :class:`ConfigError` naming the file."""
    path = task_path(task)
    if not path.is_file():
        folder = path.parent
        known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise ConfigError(f"judge task {task!r}: no file {path}" + (f"; known tasks: {known}" if known else ""))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return JudgeTask.model_validate(raw), path
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<top>'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None


def styles_for(task: JudgeTask, path: Path, lang: str) -> list[tuple[str, str]]:
    """The three styles of ``lang``; a :class:`ConfigError` saying what to fill in where they are missing."""
    if lang not in task.styles:
        raise ConfigError(f"{path}: task {task.name!r} has no language {lang!r}; it has {sorted(task.styles)}")
    pairs = task.styles[lang]
    if pairs is None:
        filled = sorted(k for k, v in task.styles.items() if v is not None)
        raise ConfigError(
            f"{path}: styles.{lang} is null: the prompt styles for {lang!r} are not filled in yet. Put the three "
            f"human-translated [prefix, suffix] pairs there (the same prompts, in the same order, as "
            f"styles.{filled[0]})"
            if filled else f"{path}: styles.{lang} is null; put three [prefix, suffix] pairs there"
        )  # fmt: skip
    return [tuple(p) for p in pairs]  # type: ignore[misc]


def filled_languages(task: JudgeTask) -> list[str]:
    """Languages whose styles are filled in, in the file's order."""
    return [lang for lang, pairs in task.styles.items() if pairs is not None]


# --------------------------------------------------------------------------------------------- instances


def _hub_offline() -> bool:
    return any(
        os.environ.get(k, "0").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def load_rows(task: JudgeTask, path: Path, lang: str) -> list[dict[str, Any]]:
    """The source rows of one language: a local JSONL/Parquet file, else the hub (only when not offline)."""
    local = task.source.files.get(lang)
    if local:
        file = (path.parent / local).resolve()
        if not file.is_file():
            raise ConfigError(f"{path}: source.files.{lang} = {local!r}: no file {file}")
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(file).to_pylist()
        rows = []
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise ConfigError(f"{file}: line {n} is not JSON (give JSONL: one JSON object a line)") from None
        return rows
    if not task.source.hub or lang not in task.source.configs:
        raise ConfigError(
            f"{path}: no source for language {lang!r}: add source.files.{lang} (a local JSONL/Parquet copy) or "
            f"source.configs.{lang} (the hub config of {task.source.hub or 'source.hub'} that holds it)"
        )
    if _hub_offline():
        raise ConfigError(
            f"{path}: {lang!r} comes from the hub dataset {task.source.hub} but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is "
            f"set; allow the download, or point source.files.{lang} at a local JSONL/Parquet copy"
        )
    import datasets

    return list(datasets.load_dataset(task.source.hub, task.source.configs[lang], split=task.source.split))


def sample(rows: Sequence[dict[str, Any]], fields: Fields, n: int, seed: int, lang: str) -> list[tuple[str, str]]:
    """``n`` (id, instruction) pairs drawn without replacement, the same for the same seed and language.

    With fewer than ``n`` rows all are taken (the caller reports the shortfall). Ids are the id column's values
    (as text), or the row index where the task names none.
    """
    instances = []
    for i, row in enumerate(rows):
        if fields.instruction not in row or (fields.id and fields.id not in row):
            want = [c for c in (fields.instruction, fields.id) if c]
            raise ConfigError(f"{lang}: row {i} has no column(s) {want}; it has {sorted(row)}: fix fields in the task")
        instances.append((str(row[fields.id]) if fields.id else str(i), str(row[fields.instruction])))
    ids = [i for i, _ in instances]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{lang}: the id column {fields.id!r} repeats values; name a unique one or none (row index)")
    # A string seed is hashed deterministically (not with Python's per-process hash), so runs agree.
    rng = random.Random(f"{seed}:{lang}")
    return [instances[i] for i in rng.sample(range(len(instances)), min(n, len(instances)))]


# ------------------------------------------------------------------------------------------------ judging


def parse_score(text: str, low: int, high: int) -> tuple[int | None, str | None]:
    """The score of a Prometheus judgement: the integer after its last ``[RESULT]``, and why there is none.

    Returns ``(score, None)``, or ``(None, "no [RESULT]")`` / ``(None, "out of range")``.
    """
    found = _RESULT.findall(text)
    if not found:
        return None, NO_RESULT
    score = int(found[-1])
    return (score, None) if low <= score <= high else (None, OUT_OF_RANGE)


def judge_prompt(criterion: Criterion, prompt: str, prediction: str) -> str:
    """The card's absolute-grading prompt for one answer and one criterion."""
    return JUDGE_PROMPT.format(a=criterion.min_score, b=criterion.max_score, input=prompt, prediction=prediction,
                               criteria=criterion.rubric)  # fmt: skip


Key = tuple[str, str, int]  # (language, instance id, style index)


class JudgeStore:
    """``judge_results.jsonl``: the settings on the first line, then records as work finishes.

    ``{"answer": ...}`` records keep the model's answer as soon as it arrives, ``{"judgements": ...}`` records the
    judge's verdicts; a rerun with the same settings reuses both, a different setup is refused.
    """

    def __init__(self, out: Path, settings: dict[str, Any]):
        self.path = Path(out) / RESULTS
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON, so a rerun compares equal
        self.answers: dict[Key, dict[str, Any]] = {}
        self.done: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._load()
        else:
            self._write_lines([{"settings": self.settings}])

    def _write_lines(self, records: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(self.path)

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").split("\n")
        tail = lines.pop()  # "" after the last newline, or a line cut short by a kill: that work runs again
        try:
            records = [json.loads(line) for line in lines]
        except ValueError:
            raise ConfigError(
                f"{self.path} is damaged (a line is not JSON); fix or delete it, or use another --out"
            ) from None
        if not records or not isinstance(records[0], dict) or not isinstance(records[0].get("settings"), dict):
            raise ConfigError(f"{self.path} does not start with its settings line; delete it or use another --out")
        old = records[0]["settings"]
        diffs = [f"{k}: {old.get(k, '<absent>')!r} -> {self.settings.get(k, '<absent>')!r}"
                 for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]  # fmt: skip
        if diffs:
            raise ConfigError(
                f"{self.path} holds results of another setup ({'; '.join(diffs)}); they must not mix with this run's. "
                f"Use another --out, or delete {self.path} to start over there"
            )
        for rec in records[1:]:
            key = (rec["lang"], rec["id"], int(rec["style"]))
            (self.done if "judgements" in rec else self.answers)[key] = rec
        if tail:
            self._write_lines(records)

    def add(self, record: dict[str, Any]) -> None:
        """Append one record, on disk at once (thread-safe: workers call it as they finish)."""
        key = (record["lang"], record["id"], int(record["style"]))
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            (self.done if "judgements" in record else self.answers)[key] = record


Chat = Callable[[list[dict[str, str]]], str]


def run(
    task: JudgeTask,
    instances: dict[str, list[tuple[str, str]]],
    styles: dict[str, list[tuple[str, str]]],
    model: Chat,
    judge: Chat,
    store: JudgeStore,
    concurrency: int = 8,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Answer and judge every (language, instance, style) not already in ``store``; all results in a fixed order.

    ``model`` and ``judge`` answer a conversation (greedy). Up to ``concurrency`` units run at once; the first
    :class:`EndpointError` stops the run (finished work stays in the store) and names the unit it happened in.
    """
    todo: list[tuple[Key, str]] = []
    order: list[Key] = []
    for lang, items in instances.items():
        for inst_id, question in items:
            for k, (prefix, suffix) in enumerate(styles[lang]):
                key = (lang, inst_id, k)
                order.append(key)
                if key not in store.done:
                    todo.append((key, prefix + question + suffix))

    def unit(key: Key, prompt: str) -> dict[str, Any]:
        lang, inst_id, k = key
        try:
            if key in store.answers:  # answered before a kill: only the judging is left
                answer = store.answers[key]["answer"]
            else:
                answer = model([{"role": "user", "content": prompt}])
                store.add({"lang": lang, "id": inst_id, "style": k, "prompt": prompt, "answer": answer})
            judgements = {}
            for c in task.criteria:
                verdict = judge([{"role": "user", "content": judge_prompt(c, prompt, answer)}])
                score, reason = parse_score(verdict, c.min_score, c.max_score)
                judgements[c.name] = {"score": score, "unparseable": reason, "judgement": verdict}
        except EndpointError as exc:
            exc.trial = f"{lang} instance {inst_id} style {k + 1}"
            raise
        rec = {"lang": lang, "id": inst_id, "style": k, "prompt": prompt, "answer": answer, "judgements": judgements}
        store.add(rec)
        return rec

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(unit, key, prompt) for key, prompt in todo]
        try:
            for f in as_completed(futures):
                rec = f.result()
                if progress:
                    progress(rec)
        except EndpointError as exc:
            for other in futures:
                other.cancel()  # not started yet: skipped; running ones finish and are stored
            exc.kept = (f"{len(store.done)} finished answer(s) are kept in {store.path}; rerun the same command "
                        "to continue from there")  # fmt: skip
            raise
        except BaseException:
            for other in futures:
                other.cancel()
            raise
    return [store.done[key] for key in order]


# ------------------------------------------------------------------------------------------------ report


def summarize(task: JudgeTask, results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per language and criterion: mean, n scored, robustness variance, unparseable counts (module docstring)."""
    report: dict[str, dict[str, Any]] = {}
    for lang in dict.fromkeys(r["lang"] for r in results):
        rows = [r for r in results if r["lang"] == lang]
        report[lang] = {}
        for c in task.criteria:
            scores = [r["judgements"][c.name]["score"] for r in rows]
            valid = [s for s in scores if s is not None]
            reasons = [r["judgements"][c.name]["unparseable"] for r in rows]
            per_instance: dict[str, list[int]] = {}
            for r, s in zip(rows, scores):
                per_instance.setdefault(r["id"], [])
                if s is not None:
                    per_instance[r["id"]].append(s)
            variances = [statistics.pvariance(v) for v in per_instance.values() if len(v) >= 2]
            styles = sorted({r["style"] for r in rows})
            by_style = []
            for k in styles:
                ks = [s for r, s in zip(rows, scores) if r["style"] == k and s is not None]
                by_style.append(statistics.fmean(ks) if ks else None)
            report[lang][c.name] = {
                "min_score": c.min_score,
                "max_score": c.max_score,
                "mean": statistics.fmean(valid) if valid else None,
                "n_scored": len(valid),
                "n_judged": len(rows),
                "unparseable": {NO_RESULT: reasons.count(NO_RESULT), OUT_OF_RANGE: reasons.count(OUT_OF_RANGE)},
                "robustness_variance": statistics.fmean(variances) if variances else None,
                "robustness_instances": len(variances),
                "robustness_excluded": len(per_instance) - len(variances),
                "mean_by_style": by_style,
            }
    return report


def write_results(
    task: JudgeTask, summary: dict[str, dict[str, Any]], out: Path, meta: dict[str, Any]
) -> dict[str, Path]:
    """``judge.json`` (summary, definitions and setup) and ``judge.png`` (bars per language and criterion)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "task": task.name,
        **meta,
        "definitions": {
            "mean": "mean of the judge's valid scores over all (instance, style) answers",
            "robustness_variance": ROBUSTNESS_DEFINITION,
            "unparseable": f"judgements without a valid score, by reason ({NO_RESULT!r}, {OUT_OF_RANGE!r}); excluded "
            "from mean and robustness_variance",
        },
        "criteria": {c.name: {"min_score": c.min_score, "max_score": c.max_score} for c in task.criteria},
        "results": summary,
        "per_answer": RESULTS,
    }
    (out / "judge.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    langs = list(summary)
    fig, axes = plt.subplots(1, len(task.criteria), figsize=(max(4.5, 1.0 + 1.1 * len(langs)) * len(task.criteria), 4),
                             squeeze=False)  # fmt: skip
    for ax, c in zip(axes[0], task.criteria):
        cells = [summary[lang][c.name] for lang in langs]
        means = [x["mean"] if x["mean"] is not None else c.min_score for x in cells]
        # Error bars: +- the standard deviation matching the robustness variance, in the criterion's own units.
        spread = [(x["robustness_variance"] or 0.0) ** 0.5 for x in cells]
        bars = ax.bar(langs, [m - c.min_score for m in means], bottom=c.min_score, yerr=spread, capsize=4,
                      width=0.6, color="#4c72b0", ecolor="#444444")  # fmt: skip
        for bar, x in zip(bars, cells):
            var = "n/a" if x["robustness_variance"] is None else f"{x['robustness_variance']:.2f}"
            mean = "n/a" if x["mean"] is None else f"{x['mean']:.2f}"
            bad = sum(x["unparseable"].values())
            label = f"{mean}\nvar {var}\nn={x['n_scored']}" + (f"\n{bad} unparsed" if bad else "")
            ax.text(bar.get_x() + bar.get_width() / 2, c.min_score + 0.02 * (c.max_score - c.min_score), label,
                    ha="center", va="bottom", fontsize=8, color="white")  # fmt: skip
        ax.set_ylim(c.min_score, c.max_score)
        ax.set_xlim(-0.75, len(langs) - 0.25)  # a lone language stays a bar, not a wall
        ax.set_title(f"{c.name} ({c.min_score}-{c.max_score})", fontsize=10)
        ax.set_xlabel("language")
        ax.set_ylabel("mean judge score")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"LLM-as-a-judge: {task.name}, {Path(str(meta.get('model', ''))).name}, judge {meta.get('judge')}\n"
                 "bars: mean score; error bars: ± sqrt(robustness variance across the 3 prompt styles)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out / "judge.png", dpi=100)
    plt.close(fig)
    return {"json": out / "judge.json", "png": out / "judge.png"}


def task_digest(task: JudgeTask) -> str:
    """A fingerprint of everything in a task that changes its results (styles, criteria, source, fields)."""
    return settings_digest(json.dumps(task.model_dump(mode="json"), sort_keys=True) + JUDGE_PROMPT)


def evaluate(
    task_name: str,
    out: Path,
    *,
    model_dir: str | None = None,
    endpoint: str | None = None,
    served_model: str | None = None,
    judge_endpoint: str | None = None,
    judge_model: str = DEFAULT_JUDGE,
    languages: Sequence[str] | None = None,
    instances: int = DEFAULT_INSTANCES,
    seed: int = 0,
    concurrency: int = 8,
    temperature: float = 0.0,
    max_new_tokens: int = 1024,
    timeout: float = TIMEOUT_S,
    retries: int = RETRIES,
    log: Callable[[str], Any] = lambda line: print(line, flush=True),
) -> dict[str, Path]:
    """``alia-nemo eval judge``: sample, answer, judge, summarize; ``judge.json`` and ``judge.png`` under ``out``.

    The model under test is a local export (``model_dir``, transformers) or an OpenAI-compatible ``endpoint``
    serving ``served_model``; the judge is always an endpoint. Everything is checked (flags, task, every asked
    language's styles, the data, the results already on disk) before the first request.
    """
    if bool(model_dir) == bool(endpoint):
        raise ConfigError("give exactly one of --model DIR (an export, transformers) or --endpoint URL")
    if endpoint and not served_model:
        raise ConfigError("--endpoint needs --served-model (the model name the server exposes)")
    if not judge_endpoint:
        raise ConfigError("judge needs --judge-endpoint URL: an OpenAI-compatible server of the judge (Prometheus-2)")
    if timeout <= 0 or retries < 0 or concurrency < 1 or instances < 1 or max_new_tokens < 1:
        raise ConfigError(
            f"--timeout {timeout:g} / --retries {retries} / --concurrency {concurrency} / --instances {instances} / "
            f"--max-new-tokens {max_new_tokens}: need > 0 seconds, >= 0 retries and >= 1 of the others"
        )
    task, path = load_task(task_name)
    langs = list(languages) if languages else filled_languages(task)
    if not languages:
        skipped = [lang for lang in task.styles if lang not in langs]
        if skipped:
            log(f"[alia-nemo] judge: no prompt styles yet for {skipped} in {path}; fill them in to evaluate those")
    styles = {lang: styles_for(task, path, lang) for lang in langs}  # every language checked before any work
    name = model_dir or served_model
    model_backend = (OpenAIBackend(endpoint, served_model, max_tokens=max_new_tokens, timeout=timeout,
                                   retries=retries) if endpoint else None)  # fmt: skip
    judge_backend = OpenAIBackend(judge_endpoint, judge_model, max_tokens=1024, timeout=timeout, retries=retries)
    sampled: dict[str, list[tuple[str, str]]] = {}
    counts: dict[str, dict[str, int]] = {}
    for lang in langs:
        rows = load_rows(task, path, lang)
        sampled[lang] = sample(rows, task.fields, instances, seed, lang)
        counts[lang] = {
            "available": len(rows),
            "sampled": len(sampled[lang]),
            "shortfall": max(0, instances - len(rows)),
        }
        if counts[lang]["shortfall"]:
            log(f"[alia-nemo] judge {lang}: only {len(rows)} instances available, {instances} asked for; taking all "
                f"(shortfall {counts[lang]['shortfall']})")  # fmt: skip
    # Everything that changes an answer or a verdict: a rerun with other values into the same out is refused.
    settings = {"task": task.name, "task_digest": task_digest(task), "languages": langs, "instances": instances,
                "seed": seed, "model": name, "temperature": temperature, "max_new_tokens": max_new_tokens,
                "judge": judge_model}  # fmt: skip
    store = JudgeStore(out, settings)
    if store.done:
        total = sum(len(v) for v in sampled.values()) * 3
        log(f"[alia-nemo] judge: {len(store.done)} of {total} answers already judged in {store.path}; running the rest")

    if model_backend is None:
        local = TransformersBackend(model_dir, max_new_tokens=max_new_tokens)
        lock = threading.Lock()  # one generate at a time: a transformers model is not thread-safe

        def model(msgs: list[dict[str, str]]) -> str:
            with lock:
                return local.chat(msgs, temperature)
    else:

        def model(msgs: list[dict[str, str]]) -> str:
            return model_backend.chat(msgs, temperature)

    def show(rec: dict[str, Any]) -> None:
        scores = ", ".join(f"{k} {v['score'] if v['score'] is not None else v['unparseable']}"
                           for k, v in rec["judgements"].items())  # fmt: skip
        log(f"[alia-nemo] judge {rec['lang']} {rec['id']} style {rec['style'] + 1}: {scores}")

    results = run(task, sampled, styles, model, lambda m: judge_backend.chat(m, 0.0), store, concurrency, show)
    meta = {"model": name, "judge": judge_model, "temperature": temperature, "seed": seed,
            "instances_requested": instances, "instances": counts, "task_file": str(path)}  # fmt: skip
    return write_results(task, summarize(task, results), out, meta)
