"""Needle in a haystack exactly as the ALIA-40b-instruct card describes it.

The needle sits at a grid of depths inside haystacks of a grid of lengths (in tokens of the model's
tokenizer, up to 163,840); the model gets the card's system prompt and, after the haystack, the card's
question, and answers greedily (temperature 0, no repetition penalty). Backends: transformers on a local
directory, or any OpenAI-compatible chat endpoint (vLLM serving an export). Scoring: a deterministic
key-phrase scorer, optionally plus an LLM judge with the card's Prometheus-2 prompt.

Nothing finished is lost: with a :class:`TrialStore` each trial is appended to ``trials.jsonl`` as it
finishes, and a rerun with the same setup skips those (a different setup is refused, never mixed in).
Endpoint requests time out, are retried with exponential backoff on connection errors, timeouts and HTTP
5xx/429, and every failure or unusable reply becomes an :class:`EndpointError` naming the endpoint, the
trial and what was wrong.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from alia_nemo.errors import AliaError, ConfigError

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
SYSTEM_PROMPT = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
QUESTION = "What is the best thing to do in San Francisco?"
KEY_PHRASES = ("sandwich", "dolores park", "sunny day")
TRIALS = "trials.jsonl"
TIMEOUT_S = 600.0
RETRIES = 3
BACKOFF_S = 1.0  # the first retry's wait, doubled at each further one (tests shorten it)
MAX_BACKOFF_S = 60.0
# The judge prompt of the card (the one Prometheus-2 was fine-tuned with), with a retrieval criterion.
JUDGE_PROMPT = (
    "You are a fair judge assistant tasked with providing clear, objective feedback based on specific criteria, "
    "ensuring each assessment reflects the absolute standards set for performance.\n\n###Task Description:\n"
    "An instruction (might include an Input inside it), a response to evaluate, and a score rubric representing a "
    "evaluation criteria are given.\n1. Write a detailed feedback that assess the quality of the response strictly "
    "based on the given score rubric, not evaluating in general.\n2. After writing a feedback, write a score that is "
    "an integer between {a} and {b}. You should refer to the score rubric.\n3. The output format should look as "
    'follows: "Feedback: (write a feedback for criteria) [RESULT] (an integer number between {a} and {b})"\n'
    "4. Please do not generate any other opening, closing, and explanations.\n\n###The instruction to evaluate:\n"
    "{input}\n\n###Response to evaluate:\n{prediction}\n\n###Score Rubrics:\n{criteria}\n\n###Feedback:"
)
RETRIEVAL_CRITERIA = (
    "[Does the response give the best thing to do in San Francisco as stated in the document: " + NEEDLE + "]\n"
    "Score 1: The response does not mention eating a sandwich or Dolores Park.\n"
    "Score 2: The response mentions one element of the statement but gets the rest wrong.\n"
    "Score 3: The response mentions eating a sandwich or sitting in Dolores Park, but not both.\n"
    "Score 4: The response mentions eating a sandwich and sitting in Dolores Park, missing the sunny day.\n"
    "Score 5: The response states eating a sandwich and sitting in Dolores Park on a sunny day."
)


def messages(context: str) -> list[dict[str, str]]:
    """The conversation a model sees: the card's system prompt, then the haystack and the question."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"{context}\n\n{QUESTION}"}]


def prompt_tokens(tokenizer, msgs: list[dict[str, str]]) -> int:
    """Tokens of the rendered conversation, generation prompt included."""
    enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    return len(enc["input_ids"])


def build_context(tokenizer, haystack: str, length: int, depth: float) -> str:
    """A haystack whose whole prompt is about ``length`` tokens, the needle at ``depth`` percent of it.

    The needle goes at the sentence boundary nearest to the depth, so no sentence is cut.
    """
    overhead = prompt_tokens(tokenizer, messages(""))
    needle_tokens = len(tokenizer(" " + NEEDLE, add_special_tokens=False)["input_ids"])
    budget = max(0, length - overhead - needle_tokens)
    ids: list[int] = []
    base = tokenizer(haystack, add_special_tokens=False)["input_ids"]
    if not base:
        raise ValueError("the haystack text is empty")
    while len(ids) < budget:
        ids += base
    text = tokenizer.decode(ids[:budget], skip_special_tokens=True)
    cut = int(len(text) * depth / 100)
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", text)]
    at = min(ends, key=lambda e: abs(e - cut)) if ends and 0 < depth < 100 else (0 if depth <= 0 else len(text))
    return (text[:at].rstrip() + " " + NEEDLE + " " + text[at:].lstrip()).strip()


def keyphrase_score(response: str) -> float:
    """Share of the needle's key phrases in the response (case-insensitive): 0, 1/3, 2/3 or 1."""
    low = response.lower()
    return sum(p in low for p in KEY_PHRASES) / len(KEY_PHRASES)


# -------------------------------------------------------------------------------------------- backends


class TransformersBackend:
    """Greedy generation with transformers from a local (exported) directory."""

    def __init__(self, model_dir: str, max_new_tokens: int = 64):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.max_new_tokens = max_new_tokens

    def chat(self, msgs: list[dict[str, str]], temperature: float = 0.0) -> str:
        import torch

        ids = self.tokenizer.apply_chat_template(
            msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = self.model.generate(
                **ids, max_new_tokens=self.max_new_tokens, do_sample=temperature > 0, temperature=temperature or None,
                repetition_penalty=1.0, top_p=None, top_k=None,
            )  # fmt: skip
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


class EndpointError(AliaError):
    """An OpenAI-compatible endpoint failed or answered something unusable.

    Names the endpoint and what was wrong; :func:`run` adds the trial and where finished trials are kept.
    """

    def __init__(self, endpoint: str, what: str):
        super().__init__(endpoint, what)
        self.endpoint, self.what = endpoint, what
        self.trial: str | None = None
        self.kept: str | None = None

    def __str__(self) -> str:
        where = f" (trial {self.trial})" if self.trial else ""
        kept = f"; {self.kept}" if self.kept else ""
        return f"endpoint {self.endpoint}{where}: {self.what}{kept}"


def _snippet(raw: bytes, limit: int = 160) -> str:
    """The start of a reply body on one line, for error messages."""
    text = raw[:limit].decode("utf-8", errors="replace")
    return " ".join(text.split()) + ("..." if len(raw) > limit else "")


def _retry_after(headers: Any) -> float | None:
    try:
        return max(0.0, float(headers.get("Retry-After")))
    except (TypeError, ValueError, AttributeError):
        return None  # absent, or an HTTP date: our own backoff applies


class OpenAIBackend:
    """Any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, TGI, a judge server).

    Each request waits at most ``timeout`` seconds; connection errors, timeouts and HTTP 5xx/429 are retried
    ``retries`` times, waiting ``backoff_s`` (default :data:`BACKOFF_S`) doubled at each retry (or the server's
    ``Retry-After``), at most :data:`MAX_BACKOFF_S`. Other HTTP errors and malformed replies fail at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_tokens: int = 64,
        timeout: float = TIMEOUT_S,
        retries: int = RETRIES,
        backoff_s: float | None = None,
        log: Callable[[str], Any] | None = None,
    ):
        if not re.match(r"https?://[^/\s]+", base_url or ""):
            raise ConfigError(f"endpoint {base_url!r}: give an http(s) base URL, e.g. http://host:8000/v1")
        if timeout <= 0 or retries < 0:
            raise ConfigError(f"endpoint {base_url}: timeout must be > 0 s and retries >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.max_tokens, self.timeout = model, api_key, max_tokens, timeout
        self.retries, self.backoff_s = retries, backoff_s
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def chat(self, msgs: list[dict[str, str]], temperature: float = 0.0) -> str:
        """The assistant's reply to ``msgs``; raises :class:`EndpointError` when none can be had."""
        body = {"model": self.model, "messages": msgs, "temperature": temperature, "max_tokens": self.max_tokens}
        return self._content(self._post(body))

    def _post(self, body: dict[str, Any]) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        attempts = self.retries + 1
        for attempt in range(attempts):
            wait: float | None = None
            try:
                req = urllib.request.Request(self.url, data, headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return resp.read()
            except urllib.error.HTTPError as exc:
                try:
                    detail = _snippet(exc.read())
                except (OSError, http.client.HTTPException):
                    detail = ""
                problem = f"HTTP {exc.code} {exc.reason}" + (f" ({detail})" if detail else "")
                if exc.code != 429 and exc.code < 500:  # the request itself is wrong: asking again won't help
                    raise EndpointError(
                        self.url, f"{problem}; check the URL (an OpenAI-compatible base ending in /v1) and the served "
                        f"model name {self.model!r}"
                    ) from None  # fmt: skip
                advice, wait = "check the server's log", _retry_after(exc.headers)
            except (TimeoutError, urllib.error.URLError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, TimeoutError):
                    problem, advice = f"no reply within {self.timeout:g} s", "raise --timeout for long prompts"
                elif isinstance(reason, ConnectionRefusedError):
                    problem, advice = "connection refused", "is the server running and listening at that address?"
                else:
                    problem, advice = f"can not connect ({reason})", "is the address right and the server reachable?"
            except (ConnectionError, http.client.HTTPException, OSError) as exc:  # reset, dropped mid-reply
                problem, advice = f"the connection failed ({type(exc).__name__}: {exc})", "check the server's log"
            if attempt == attempts - 1:
                raise EndpointError(self.url, f"{problem}, after {attempts} attempt(s) (--retries {self.retries}); "
                                    f"{advice}")  # fmt: skip
            delay = (BACKOFF_S if self.backoff_s is None else self.backoff_s) * 2**attempt
            delay = min(MAX_BACKOFF_S, max(delay, wait or 0.0))
            self.log(f"[alia-nemo] {self.url}: {problem}; retry {attempt + 1} of {self.retries} in {delay:g} s")
            time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _content(self, raw: bytes) -> str:
        """``choices[0].message.content`` of a reply, or an :class:`EndpointError` saying what is wrong with it."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise EndpointError(
                self.url, f"the reply is not JSON (it starts {_snippet(raw, 60)!r}); is this an OpenAI-compatible "
                "endpoint (a base URL ending in /v1)?"
            ) from None  # fmt: skip
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            shape = f"keys {sorted(data)[:8]}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
            error = data.get("error") if isinstance(data, dict) else None
            if isinstance(error, dict):
                error = error.get("message", error)
            why = f"; it says: {_snippet(str(error).encode())}" if error else ""
            raise EndpointError(self.url, f"the reply has no choices ({shape}){why}")
        first = choices[0] if isinstance(choices[0], dict) else {}
        message = first.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            what = "missing or null" if content is None else f"a JSON {type(content).__name__}"
            raise EndpointError(
                self.url, f"the reply's choices[0].message.content is {what}, not text "
                f"(finish_reason {first.get('finish_reason')!r})"
            )  # fmt: skip
        return content


def judge_score(judge: OpenAIBackend, response: str) -> int | None:
    """The judge's 1-5 score for ``response`` (None when it gives no ``[RESULT] n``)."""
    prompt = JUDGE_PROMPT.format(a=1, b=5, input=QUESTION, prediction=response, criteria=RETRIEVAL_CRITERIA)
    out = judge.chat([{"role": "user", "content": prompt}], temperature=0.0)
    m = re.search(r"\[RESULT\]\s*(\d+)", out)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------------- run


@dataclass
class Trial:
    """One (length, depth) cell: the prompt's size, the model's answer and its scores."""

    length: int
    depth: float
    prompt_tokens: int
    response: str
    score: float
    judge: int | None = None


def parse_grid(lengths: str, depths: str) -> tuple[list[int], list[float]]:
    """``--lengths`` and ``--depths`` (comma lists) as numbers; a clear error for anything else."""
    try:
        ls = [int(float(x)) for x in lengths.split(",") if x.strip()]
        ds = [float(x) for x in depths.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--lengths {lengths!r} / --depths {depths!r}: give comma-separated numbers, e.g. --lengths 4096,32768 "
            "--depths 0,50,100"
        ) from None
    if not ls or not ds or min(ls) <= 0 or not all(0 <= d <= 100 for d in ds):
        raise ConfigError("--lengths needs positive token counts and --depths percentages from 0 to 100")
    return ls, ds


def settings_digest(text: str) -> str:
    """A short fingerprint of a text (the haystack, the card's prompts) for a run's settings."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class TrialStore:
    """``trials.jsonl`` in an output directory: the setup on the first line, then each trial as it finishes.

    A rerun with the same setup gets the finished trials back (``trials``, keyed by (length, depth)) and runs only
    the others; a different setup is refused, so two setups' trials never mix. ``fresh`` starts over.
    """

    def __init__(self, out: Path, settings: dict[str, Any], fresh: bool = False):
        self.path = Path(out) / TRIALS
        prompts = settings_digest(NEEDLE + SYSTEM_PROMPT + QUESTION)  # the card's texts, should they ever change
        # As it reads back from JSON (tuples become lists), so a rerun compares equal.
        self.settings = json.loads(json.dumps({**settings, "card_prompts": prompts}))
        self.trials: dict[tuple[int, float], Trial] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.unlink(missing_ok=True)
        if self.path.exists():
            self._load()
        else:
            self._rewrite([{"settings": self.settings}])

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(self.path)

    def _damaged(self, why: str) -> ConfigError:
        return ConfigError(
            f"{self.path} {why}; it holds this output directory's finished trials. Fix or remove it (the trials "
            "then run again), or use another --out"
        )

    def _load(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError:
            raise self._damaged("is not UTF-8 text") from None
        tail = lines.pop()  # "" after the last newline, or a line cut short when a run was killed
        records = []
        for n, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except ValueError:
                raise self._damaged(f"line {n} is not JSON") from None
        if not records or not isinstance(records[0], dict) or not isinstance(records[0].get("settings"), dict):
            raise self._damaged("does not start with its settings line")
        old = records[0]["settings"]
        diffs = [f"{k}: {old.get(k, '<absent>')!r} -> {self.settings.get(k, '<absent>')!r}"
                 for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]  # fmt: skip
        if diffs:
            raise ConfigError(
                f"{self.path} holds {len(records) - 1} trial(s) of another setup ({'; '.join(diffs)}); they must not "
                f"mix with this run's. Use another --out, or delete {self.path} to start over there"
            )
        names = {f.name for f in fields(Trial)}
        for n, rec in enumerate(records[1:], 2):
            try:
                if not isinstance(rec, dict) or not {"length", "depth", "response", "score"} <= set(rec) <= names:
                    raise TypeError
                trial = Trial(**rec)
                self.trials[(int(trial.length), float(trial.depth))] = trial
            except (TypeError, ValueError):
                raise self._damaged(f"line {n} is not a trial") from None
        if tail:  # keep the complete lines only: that trial runs again
            self._rewrite(records)

    def add(self, trial: Trial) -> None:
        """Append a finished trial, on disk at once (a later failure or a kill does not lose it)."""
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(trial), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.trials[(int(trial.length), float(trial.depth))] = trial


def run(
    chat: Callable[[list[dict[str, str]]], str],
    tokenizer,
    haystack: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    judge: OpenAIBackend | None = None,
    progress: Callable[[Trial], None] | None = None,
    store: TrialStore | None = None,
) -> list[Trial]:
    """Every (length, depth) cell once, in grid order; ``chat`` answers a conversation (greedy).

    With ``store``, cells it already holds are not asked again and each new trial is saved as it finishes; an
    :class:`EndpointError` is completed with the trial it happened in and where the finished trials are.
    """
    trials = []
    for length in lengths:
        for depth in depths:
            key = (int(length), float(depth))
            if store is not None and key in store.trials:
                trials.append(store.trials[key])
                continue
            context = build_context(tokenizer, haystack, length, depth)
            msgs = messages(context)
            n = prompt_tokens(tokenizer, msgs)
            try:
                response = chat(msgs)
                trial = Trial(int(length), float(depth), n, response, keyphrase_score(response))
                if judge is not None:
                    trial.judge = judge_score(judge, response)
            except EndpointError as exc:
                exc.trial = f"length {int(length):,} tokens, depth {float(depth):g}%"
                if store is not None:
                    exc.kept = (f"{len(store.trials)} finished trial(s) are kept in {store.path}; rerun the same "
                                "command to continue from there")  # fmt: skip
                raise
            if store is not None:
                store.add(trial)
            trials.append(trial)
            if progress:
                progress(trial)
    return trials


def write_results(trials: list[Trial], out: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """``niah.json`` (every trial + the setup) and ``niah.png`` (depth x length heat map of the score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    lengths = sorted({t.length for t in trials})
    depths = sorted({t.depth for t in trials})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for t in trials:
        grid[depths.index(t.depth), lengths.index(t.length)] = t.score
    summary = {
        "needle": NEEDLE,
        "system_prompt": SYSTEM_PROMPT,
        "question": QUESTION,
        **meta,
        "mean_score": float(np.nanmean(grid)),
        "trials": [asdict(t) for t in trials],
    }
    (out / "niah.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.9 * len(lengths)), max(3.0, 1.2 + 0.5 * len(depths))))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"needle in a haystack: {Path(str(meta.get('model', ''))).name}", fontsize=10)
    fig.colorbar(im, ax=ax, label="key-phrase score")
    fig.tight_layout()
    fig.savefig(out / "niah.png", dpi=100)
    plt.close(fig)
    return {"json": out / "niah.json", "png": out / "niah.png"}


def default_haystack() -> str:
    """Filler text: the bundled plain-text sample (CC0), all languages, in a fixed order."""
    from alia_nemo.sample_data import sample_path

    texts = []
    for lang in ("en", "es", "ca", "eu", "gl", "pt"):
        for line in sample_path(f"cpt_sample_{lang}.jsonl").read_text(encoding="utf-8").splitlines():
            texts.append(json.loads(line)["text"].replace("\n", " "))
    return " ".join(texts)
