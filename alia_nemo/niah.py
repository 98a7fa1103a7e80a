"""Needle in a haystack exactly as the ALIA-40b-instruct card describes it.

The needle sits at a grid of depths inside haystacks of a grid of lengths (in tokens of the model's
tokenizer, up to 163,840); the model gets the card's system prompt and, after the haystack, the card's
question, and answers greedily (temperature 0, no repetition penalty). Backends: transformers on a local
directory, or any OpenAI-compatible chat endpoint (vLLM serving an export). Scoring: a deterministic
key-phrase scorer, optionally plus an LLM judge with the card's Prometheus-2 prompt.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
SYSTEM_PROMPT = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
QUESTION = "What is the best thing to do in San Francisco?"
KEY_PHRASES = ("sandwich", "dolores park", "sunny day")
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


class OpenAIBackend:
    """Any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, TGI, a judge server)."""

    def __init__(
        self, base_url: str, model: str, api_key: str | None = None, max_tokens: int = 64, timeout: float = 600
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.max_tokens, self.timeout = model, api_key, max_tokens, timeout

    def chat(self, msgs: list[dict[str, str]], temperature: float = 0.0) -> str:
        body = {"model": self.model, "messages": msgs, "temperature": temperature, "max_tokens": self.max_tokens}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())["choices"][0]["message"]["content"]


def judge_score(judge: OpenAIBackend, response: str) -> int | None:
    """The judge's 1-5 score for ``response`` (None when it gives no ``[RESULT] n``)."""
    prompt = JUDGE_PROMPT.format(a=1, b=5, input=QUESTION, prediction=response, criteria=RETRIEVAL_CRITERIA)
    out = judge.chat([{"role": "user", "content": prompt}], temperature=0.0)
    m = re.search(r"\[RESULT\]\s*(\d+)", out)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------------- run


@dataclass
class Trial:
    length: int
    depth: float
    prompt_tokens: int
    response: str
    score: float
    judge: int | None = None


def run(
    chat: Callable[[list[dict[str, str]]], str],
    tokenizer,
    haystack: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    judge: OpenAIBackend | None = None,
    progress: Callable[[Trial], None] | None = None,
) -> list[Trial]:
    """Every (length, depth) cell once; ``chat`` answers a conversation (greedy)."""
    trials = []
    for length in lengths:
        for depth in depths:
            context = build_context(tokenizer, haystack, length, depth)
            msgs = messages(context)
            n = prompt_tokens(tokenizer, msgs)
            response = chat(msgs)
            trial = Trial(length, depth, n, response, keyphrase_score(response))
            if judge is not None:
                trial.judge = judge_score(judge, response)
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
