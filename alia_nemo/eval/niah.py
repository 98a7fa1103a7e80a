"""Needle in a haystack exactly as the ALIA-40b-instruct card describes it.

The needle sits at a grid of depths inside haystacks of a grid of lengths (in tokens of the model's
tokenizer, up to 163,840); the model gets the card's system prompt and, after the haystack, the card's
question, and answers greedily (temperature 0, no repetition penalty). Backends: transformers on a local
directory, or any OpenAI-compatible chat endpoint (vLLM serving an export). Scoring: a deterministic
key-phrase scorer, optionally plus an LLM judge with the card's Prometheus-2 prompt.

The default grid follows the model's context (:func:`default_lengths`, :func:`find_context`): a model is never
asked, unless explicitly, for prompts longer than it can read, and cells beyond its context are marked
``beyond_context`` in ``niah.json`` and hatched in ``niah.png``. Before a run, :func:`probe` times the backend
so that :class:`Estimate` can say how long the grid will take; :class:`GridProgress` shows progress as it runs.

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
        self.base = base_url.rstrip("/")
        self.url = self.base + "/chat/completions"
        self.model, self.api_key, self.max_tokens, self.timeout = model, api_key, max_tokens, timeout
        self.retries, self.backoff_s = retries, backoff_s
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def chat(self, msgs: list[dict[str, str]], temperature: float = 0.0) -> str:
        """The assistant's reply to ``msgs``; raises :class:`EndpointError` when none can be had."""
        body = {"model": self.model, "messages": msgs, "temperature": temperature, "max_tokens": self.max_tokens}
        return self._content(self._post(body))

    def served_context(self, timeout: float = 10.0) -> int | None:
        """The served model's context, ``max_model_len`` in ``GET /models`` (vLLM's), or None when not there.

        One short request, no retries and no error: the context only shapes the default grid, and a server that
        does not say (or is not up yet) must not stop the run here; the trials then report what is wrong.
        """
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            req = urllib.request.Request(self.base + "/models", headers=headers)
            with urllib.request.urlopen(req, timeout=min(timeout, self.timeout)) as resp:
                data = json.loads(resp.read())
        except (OSError, ValueError, http.client.HTTPException):
            return None
        models = data.get("data") if isinstance(data, dict) else None
        for entry in models if isinstance(models, list) else []:
            if isinstance(entry, dict) and entry.get("id") == self.model:
                size = entry.get("max_model_len")
                return size if isinstance(size, int) and size > 0 else None
        return None

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


# ------------------------------------------------------------------------------------------------ grid

CARD_LENGTHS = (4096, 16384, 32768, 65536, 131072, 163840)  # the card's grid, for ALIA-40b's 163,840-token context
CARD_DEPTHS = (0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 100.0)
MIN_DEFAULT_LENGTHS = 3  # fewer columns show no trend over length
# Keys a config.json may give the context under, the usual one first (GPT-2 style and some others use the rest).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class Context:
    """A model's context in tokens (None: unknown) and where that came from (or why it is unknown), for messages."""

    tokens: int | None
    source: str


def default_lengths(context: int | None) -> list[int]:
    """The default ``--lengths`` for a model whose context is ``context`` tokens (None: unknown).

    The rule: the card's lengths (4,096 ... 163,840) that fit the context, plus the context itself; when that makes
    fewer than three lengths, a quarter and a half of the context are added. So 163,840 gives the card's six,
    32,768 gives 4,096, 16,384 and 32,768, 4,096 gives 1,024, 2,048 and 4,096, and 1,024 gives 256, 512 and 1,024.
    An unknown context gives the card's lengths. A length is the prompt's, as on the card: the answer's tokens come
    on top of it.
    """
    if not context:
        return list(CARD_LENGTHS)
    lengths = {n for n in CARD_LENGTHS if n <= context} | {context}
    if len(lengths) < MIN_DEFAULT_LENGTHS:
        lengths |= {max(1, context // 4), max(1, context // 2)}
    return sorted(lengths)


def config_context(model: str | None) -> Context:
    """The context a model's ``config.json`` declares: a local directory, or a hub id already in the local cache
    (looked up offline: sizing the grid must not download anything)."""
    if not model:
        return Context(None, "no model directory")
    path = Path(model) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except (ImportError, ValueError, OSError):  # not a valid hub id either
            cached = None
        if not isinstance(cached, str):
            return Context(None, f"no config.json in {model}")
        path = Path(cached)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Context(None, f"{path} is not readable JSON")
    # Multimodal configs keep the language model's settings in text_config.
    for conf in (config, config.get("text_config")) if isinstance(config, dict) else ():
        for key in CONTEXT_KEYS if isinstance(conf, dict) else ():
            if isinstance(conf.get(key), int) and conf[key] > 0:
                return Context(conf[key], f"{key} in {path}")
    return Context(None, f"{path} gives no {CONTEXT_KEYS[0]}")


def find_context(model_dir: str | None = None, endpoint: OpenAIBackend | None = None,
                 tokenizer: str | None = None) -> Context:  # fmt: skip
    """The context of the model under test: ``model_dir``'s config.json; for an ``endpoint``, the served model's
    ``max_model_len`` (what the server accepts), else the config.json next to ``tokenizer``."""
    if endpoint is None:
        return config_context(model_dir)
    served = endpoint.served_context()
    if served:
        return Context(served, f"max_model_len of {endpoint.model!r} at {endpoint.base}/models")
    found = config_context(tokenizer)
    if found.tokens:
        return found
    return Context(None, f"{endpoint.base}/models gives no max_model_len for {endpoint.model!r}; {found.source}")


def beyond(lengths: Sequence[int], context: int | None) -> list[int]:
    """The lengths longer than ``context`` (none when it is unknown)."""
    return [n for n in lengths if context and n > context]


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


# ----------------------------------------------------------------------------------- estimate, progress

PROBE_TOKENS = (128, 1024)  # two sizes tell an answer's fixed cost from the cost of each prompt token


def probe(
    chat: Callable[[list[dict[str, str]]], str], tokenizer, haystack: str, context: int | None = None
) -> list[tuple[int, float]]:
    """(prompt tokens, seconds) of one or two short timed chats, each built and answered like a trial (needle at
    50%, building the prompt included); the answers are discarded. Sizes above ``context`` are cut to it.

    An untimed chat at the smallest size goes first: a backend's first call pays one-time costs (kernel selection,
    allocator warm-up) that would otherwise be read as a cost of every trial.
    """
    sizes = sorted({min(n, context) if context else n for n in PROBE_TOKENS})
    chat(messages(build_context(tokenizer, haystack, sizes[0], 50.0)))
    points = []
    for size in sizes:
        start = time.monotonic()
        msgs = messages(build_context(tokenizer, haystack, size, 50.0))
        chat(msgs)
        points.append((prompt_tokens(tokenizer, msgs), time.monotonic() - start))
    return points


@dataclass(frozen=True)
class Estimate:
    """Seconds a trial takes as ``fixed_s + per_token_s * prompt tokens``, a straight line through timed chats.

    A line is what a few short measurements can tell; attention's cost grows faster than linearly at long
    contexts, so the longest cells may take longer than this says.
    """

    fixed_s: float
    per_token_s: float

    @classmethod
    def fit(cls, points: Sequence[tuple[int, float]]) -> Estimate | None:
        """Least squares through (prompt tokens, seconds); None without points. One size: proportional to tokens."""
        pts = [(float(n), float(t)) for n, t in points if n > 0 and t >= 0]
        if not pts:
            return None
        mean_n, mean_t = sum(n for n, _ in pts) / len(pts), sum(t for _, t in pts) / len(pts)
        var = sum((n - mean_n) ** 2 for n, _ in pts)
        if var == 0:
            return cls(0.0, mean_t / mean_n)
        slope = sum((n - mean_n) * (t - mean_t) for n, t in pts) / var
        if slope <= 0:  # timing noise (a warm-up) or a fixed cost that dominates: every trial like the mean
            return cls(mean_t, 0.0)
        fixed = mean_t - slope * mean_n
        if fixed < 0:  # a line through the origin instead: no trial is estimated at under nothing
            return cls(0.0, sum(n * t for n, t in pts) / sum(n * n for n, _ in pts))
        return cls(fixed, slope)

    def seconds(self, tokens: int) -> float:
        """The estimated seconds of a trial whose prompt has ``tokens`` tokens."""
        return self.fixed_s + self.per_token_s * tokens

    def total(self, lengths: Sequence[int]) -> float:
        """The estimated seconds of trials of these lengths."""
        return sum(self.seconds(n) for n in lengths)


def duration(seconds: float) -> str:
    """Seconds as people read them: ``under 1 s``, ``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = round(seconds)
    if seconds < 1:
        return "under 1 s"
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def about(seconds: float) -> str:
    """An estimated duration: ``~42 s``, or ``under 1 s``."""
    return duration(seconds) if seconds < 1 else "~" + duration(seconds)


def _fmt_lengths(lengths: Sequence[int], context: int | None) -> str:
    return ", ".join(f"{n:,}" + (" (beyond context)" if context and n > context else "") for n in lengths)


def grid_lines(lengths: Sequence[int], depths: Sequence[float], context: Context, explicit: bool) -> list[str]:
    """What a run says before it starts: the model's context and where it came from, and the grid."""
    if context.tokens:
        head = f"niah: the model's context is {context.tokens:,} tokens ({context.source})"
    else:
        assumed = "" if explicit else f"; assuming the card's lengths, up to {CARD_LENGTHS[-1]:,} tokens"
        head = f"niah: the model's context is unknown ({context.source}){assumed}"
    which = ("--lengths as given" if explicit else
             f"the default for {'a ' + format(context.tokens, ',') + '-token' if context.tokens else 'an unknown'} "
             "context; --lengths to choose others")  # fmt: skip
    trials = len(lengths) * len(depths)
    return [
        head,
        f"niah: grid of {len(lengths)} length(s) x {len(depths)} depth(s) = {trials} trials ({which})",
        f"  lengths (prompt tokens): {_fmt_lengths(lengths, context.tokens)}",
        f"  depths (% into the haystack): {', '.join(f'{d:g}' for d in depths)}",
    ]


def estimate_line(pending: Sequence[int], points: Sequence[tuple[int, float]], judged: bool = False) -> str:
    """The time estimate for the trials still to run (``pending``: their lengths), from ``points`` (timed probes;
    none for an endpoint, which gets no requests beyond the grid's: the progress lines then estimate from the
    finished trials)."""
    est = Estimate.fit(points)
    if est is None:
        return (f"niah: {len(pending)} trial(s) to run; time estimate from the first trial on (an endpoint is sent "
                "no extra requests to time it)")  # fmt: skip
    timed = ", ".join(f"{n:,} tokens: {t:.2g} s" for n, t in points)
    extra = "; the judge's replies come on top" if judged else ""
    return (f"niah: estimated time {about(est.total(pending))} for {len(pending)} trial(s), the longest "
            f"{about(est.seconds(max(pending)))} each. An estimate: {len(points)} timed chat(s) after a warm-up "
            f"({timed}), scaled linearly by each cell's prompt tokens; long contexts may take longer"
            f"{extra}")  # fmt: skip


class GridProgress:
    """Progress over a run's trials, as :func:`run`'s ``progress`` callback.

    On a terminal (``stream.isatty()``) a tqdm bar with the trials done and the estimated time left, each trial's
    line printed above it; elsewhere (a log file, a pipe, CI) one plain line per trial with the same figures, so
    logs get no carriage-return noise. Each finished trial's time (since the previous one finished) refits the
    estimate, so it improves as the run goes. ``pending`` holds the lengths of the cells still to run, in order.
    """

    def __init__(
        self,
        pending: Sequence[int],
        total: int,
        points: Sequence[tuple[int, float]] = (),
        context: int | None = None,
        stream: Any = None,
        out: Any = None,
    ):
        self.pending, self.total, self.context = list(pending), total, context
        self.done = total - len(self.pending)
        self.points = list(points)
        self.out = out or sys.stdout
        stream = stream or sys.stderr
        self.last = time.monotonic()
        self.bar = None
        try:
            width: int | None = os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, OSError, ValueError):  # no file descriptor (a wrapped stream): let tqdm decide
            width = None
        # A terminal that reports 0 columns (a bare pty) would get an invisible bar: plain lines then.
        if getattr(stream, "isatty", lambda: False)() and width != 0:
            from tqdm import tqdm

            shape = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} trials [{elapsed}{postfix}]"
            self.bar = tqdm(total=total, initial=self.done, file=stream, desc="niah", dynamic_ncols=width is not None,
                            ncols=None if width else 100, bar_format=shape)  # fmt: skip
            self.bar.set_postfix_str(self.left())

    def left(self) -> str:
        """The estimated time the pending trials take, refitted to every timing so far."""
        est = Estimate.fit(self.points)
        if not self.pending:
            return "done"
        return f"{about(est.total(self.pending))} left" if est else "time left: after the first trial"

    def __call__(self, trial: Trial) -> None:
        now = time.monotonic()
        self.points.append((trial.prompt_tokens, now - self.last))
        self.last = now
        if self.pending:
            self.pending.pop(0)
        self.done += 1
        mark = " (beyond context)" if self.context and trial.length > self.context else ""
        cell = (f"{trial.length:>7,} tokens depth {trial.depth:>5g}%: score {trial.score:.2f} "
                f"{trial.response[:60]!r}{mark}")  # fmt: skip
        if self.bar is not None:
            self.bar.set_postfix_str(self.left(), refresh=False)
            self.bar.update(1)
            self.bar.write(f"[alia-nemo] niah {cell}", file=self.out)
        else:
            count = f"{self.done:>{len(str(self.total))}}/{self.total}"
            print(f"[alia-nemo] niah [{count}, {self.left()}] {cell}", file=self.out, flush=True)

    def close(self) -> None:
        """End the bar (a no-op for plain lines); call it also when the run fails, before the error is printed."""
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- results


def heat_map(trials: Sequence[Trial], context: int | None) -> tuple[list[int], list[float], Any, list[bool]]:
    """The heat map's data: its lengths (columns), depths (rows), the score grid (NaN where no trial) and, per
    column, whether that length is beyond the model's ``context`` (all False when it is unknown)."""
    import numpy as np

    lengths = sorted({t.length for t in trials})
    depths = sorted({t.depth for t in trials})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for t in trials:
        grid[depths.index(t.depth), lengths.index(t.length)] = t.score
    return lengths, depths, grid, [bool(context and n > context) for n in lengths]


def write_results(trials: list[Trial], out: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """``niah.json`` (every trial + the setup) and ``niah.png`` (depth x length heat map of the score).

    ``meta["context"]`` is the model's context in tokens (None: unknown); without that key it is read from
    ``meta["model"]``'s config.json when that is a local directory. Trials longer than it get
    ``"beyond_context": true`` (null when the context is unknown) and their columns are hatched in the heat map.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    if "context" not in meta:
        model = str(meta.get("model") or "")
        meta["context"] = config_context(model).tokens if model and Path(model).is_dir() else None
    context = meta["context"]
    lengths, depths, grid, past = heat_map(trials, context)
    summary = {
        "needle": NEEDLE,
        "system_prompt": SYSTEM_PROMPT,
        "question": QUESTION,
        **meta,
        "lengths_beyond_context": beyond(lengths, context),
        "mean_score": float(np.nanmean(grid)),
        "trials": [{**asdict(t), "beyond_context": t.length > context if context else None} for t in trials],
    }
    (out / "niah.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.9 * len(lengths)), max(3.0, 1.2 + 0.5 * len(depths))))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    labels = [f"{n:,}" + ("\nbeyond context" if b else "") for n, b in zip(lengths, past)]
    ax.set_xticks(range(len(lengths)), labels, rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    for j in (j for j, b in enumerate(past) if b):  # hatched: a score there says nothing about the model
        ax.add_patch(Rectangle((j - 0.5, -0.5), 1, len(depths), fill=False, hatch="//", edgecolor="0.3",
                               linewidth=0, label="beyond context"))  # fmt: skip
    title = f"needle in a haystack: {Path(str(meta.get('model', ''))).name}"
    if any(past):
        title += f"\nhatched: beyond the model's {context:,}-token context"
    ax.set_title(title, fontsize=10)
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
