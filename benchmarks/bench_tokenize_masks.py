"""Throughput of the SFT processor NeMo-RL calls per conversation: NeMo-RL's own ``sft_processor`` against ours.

Three methods turn the same generated chat conversations, with the same tokenizer, into NeMo-RL DatumSpecs
(a ``message_log`` of entries with ``role`` and a ``token_ids`` tensor):

  nemo_rl          ``nemo_rl.data.processors.sft_processor``, NeMo-RL v0.7.0's own code, called at run time
                   (``add_bos=True, add_eos=False``: what ``alia-nemo compile`` sets). Per message it renders
                   the prefix with ``apply_chat_template``, finds the new chunk and tokenises it.
  ours_retokenise  ``alia_nemo.nemo_rl.processor.alia_sft_processor`` on a datum with ``messages`` only: one
                   render and one tokenizer call per conversation, the log cut along the loss mask.
  ours_stored      the same processor on a datum that also carries the ids and loss mask ``prepare`` stored
                   (``tokenize_conversations``) with the tokenizer and template hashes: no tokenisation.

Each method runs in its own fresh process (``sys.executable``), once per round; the rounds alternate the order
(round 1: nemo_rl, ours_retokenise, ours_stored; round 2 starts with ours_retokenise; ...). The parent generates
the conversations once and writes them, and the stored ids, to a temporary JSONL; a child loads them, builds its
datums, runs a few conversations untimed (warm-up) and times only the loop of processor calls. The median over the
rounds is reported per method, with every round.

Correctness: ours_retokenise and ours_stored must give identical message logs (roles, contents and token ids per
entry) for every conversation: asserted. For NeMo-RL the concatenated token ids are compared with ours per
conversation and the equal ones counted, not asserted: NeMo-RL trains whole ``assistant`` entries, headers
included, while ours puts the ``<|im_start|>assistant\\n`` header in an untrained entry, so the entries (and the
masks NeMo-RL derives from them) differ by design.

Target: ours_stored >= 10x nemo_rl conversations/s (medians).

Run it in the NeMo-RL CPU harness, so all three use one interpreter and one tokenizers version:

    tests/nemo_rl/harness.sh python benchmarks/bench_tokenize_masks.py \\
        [--n 3000] [--rounds 3] [--seed 0] [--tokenizer PATH] \\
        [--json benchmarks/results/tokenize_masks_cpu2.json] [--txt benchmarks/results/tokenize_masks_cpu2.txt]

``--tokenizer`` takes a real ALIA tokenizer directory (never downloaded); the default is the built-in 1,024-piece
test tokenizer with ALIA's layout (``alia_nemo.model.tokenizer.build_test_tokenizer``). ``--profile`` (automatic
when the target is missed) runs ours_stored once more under cProfile and reports where its time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alia_nemo.model.chatml import IM_END, IM_START

TARGET = 10.0
METHODS = ("nemo_rl", "ours_retokenise", "ours_stored")
REFERENCE = "nemo_rl"
TASK_NAME = "bench"
MAX_SEQ_LENGTH = 1 << 30  # no conversation is cut: every method does its whole work
HARNESS_HINT = "tests/nemo_rl/harness.sh python benchmarks/bench_tokenize_masks.py"

Message = dict[str, str]
Datum = dict[str, Any]

# Small per-language word lists, with the languages' own letters so the tokenizer meets non-ASCII text.
_WORD_LISTS = {
    "ca": "el la els les un una que però també perquè això aquí així molt més menys casa ciutat aigua "
    "llengua català història música escola família treball país món temps dia nit any setmana força "
    "petit gran bé mal nou vell fàcil difícil pràctic pública econòmica cultura ús través només "
    "sóc és són està estem tenim fer dir veure anar venir",
    "en": "the a an and but because also this that here there very more less house city water language "
    "history music school family work country world time day night year week strength small big good "
    "bad new old easy difficult practical public economic culture use through only is are was were have "
    "make say see go come naïve café résumé",
    "es": "el la los las un una que pero también porque esto aquí así muy más menos casa ciudad agua "
    "lengua español historia música escuela familia trabajo país mundo tiempo día noche año semana "
    "fuerza pequeño grande bien mal nuevo viejo fácil difícil práctico pública económica cultura "
    "través sólo está están tenemos hacer decir ver ir venir niño señor",
    "eu": "eta baina ere hau hori hemen hor oso gehiago gutxiago etxe hiri ur hizkuntza euskara historia "
    "musika eskola familia lan herri mundu denbora egun gau urte aste indar txiki handi ondo gaizki "
    "berri zahar erraz zail praktiko publiko ekonomiko kultura bidez bakarrik da dira zen ziren dugu "
    "egin esan ikusi joan etorri zergatik nola",
    "gl": "o a os as un unha que pero tamén porque isto aquí así moi máis menos casa cidade auga lingua "
    "galego historia música escola familia traballo país mundo tempo día noite ano semana forza "
    "pequeno grande ben mal novo vello doado difícil práctico pública económica cultura través só "
    "está están temos facer dicir ver ir vir xente",
    "pt": "o a os as um uma que mas também porque isto aqui assim muito mais menos casa cidade água "
    "língua português história música escola família trabalho país mundo tempo dia noite ano semana "
    "força pequeno grande bem mal novo velho fácil difícil prático pública econômica cultura através "
    "só está estão temos fazer dizer ver ir vir não coração ação",
}
WORDS: dict[str, list[str]] = {lang: text.split() for lang, text in _WORD_LISTS.items()}
PUNCT = [".", ".", ".", "?", "!", ":", ";"]
SYSTEM_PROMPTS = {
    "ca": "Ets un assistent útil que respon en català.",
    "en": "You are a helpful assistant.",
    "es": "Eres un asistente útil que responde en español.",
    "eu": "Euskaraz erantzuten duen laguntzaile erabilgarria zara.",
    "gl": "Es un asistente útil que responde en galego.",
    "pt": "Você é um assistente útil que responde em português.",
}


def _token(rng: random.Random, words: list[str]) -> str:
    r = rng.random()
    if r < 0.04:
        return str(rng.randint(0, 2030))
    if r < 0.05:
        return f"{rng.randint(0, 99)},{rng.randint(0, 9)}%"
    if r < 0.06:
        return f"({rng.choice(words)})"
    if r < 0.07:
        return f"«{rng.choice(words)}»"
    word = rng.choice(words)
    return word + "," if rng.random() < 0.07 else word


def make_text(rng: random.Random, lang: str, n_words: int) -> str:
    """``n_words`` words of pseudo-prose in ``lang``: sentences, paragraphs, sometimes a short list."""
    words = WORDS[lang]
    out: list[str] = []
    sentence: list[str] = []
    left = n_words
    while left > 0:
        k = min(left, rng.randint(4, 22))
        sentence = [_token(rng, words) for _ in range(k)]
        sentence[0] = sentence[0][:1].upper() + sentence[0][1:]
        sentence[-1] = sentence[-1].rstrip(",") + rng.choice(PUNCT)
        if rng.random() < 0.05:
            out.append("\n- " + " ".join(sentence))
        else:
            if out and rng.random() < 0.15:
                out.append("\n\n")
            elif out:
                out.append(" ")
            out.append(" ".join(sentence))
        left -= k
    return "".join(out).lstrip()


def make_conversations(n: int, seed: int) -> list[list[Message]]:
    """``n`` deterministic training conversations: half single-turn, the rest 2-4 exchanges, ~15% with a system turn."""
    rng = random.Random(seed)
    langs = sorted(WORDS)
    conversations = []
    for _ in range(n):
        lang = rng.choice(langs)
        messages: list[Message] = []
        if rng.random() < 0.15:
            messages.append({"role": "system", "content": SYSTEM_PROMPTS[lang]})
        for _ in range(1 if rng.random() < 0.5 else rng.randint(2, 4)):
            messages.append({"role": "user", "content": make_text(rng, lang, rng.randint(10, 150))})
            messages.append({"role": "assistant", "content": make_text(rng, lang, rng.randint(30, 600))})
        assert not any(IM_START in m["content"] or IM_END in m["content"] for m in messages)
        conversations.append(messages)
    return conversations


# ---------------------------------------------------------------------------------------------------------------
# Shared by parent and children


def load_bench_tokenizer(spec: str | None) -> Any:
    from alia_nemo.model.tokenizer import build_test_tokenizer, load_tokenizer

    return load_tokenizer(spec) if spec else build_test_tokenizer()


def require_nemo_rl() -> None:
    """Exit with a clear message when NeMo-RL is not importable from this interpreter."""
    try:
        import nemo_rl.data.processors  # noqa: F401
    except ImportError as exc:
        sys.exit(
            f"bench_tokenize_masks: NeMo-RL is not importable from {sys.executable} ({exc}).\n"
            f"Run the benchmark through the NeMo-RL CPU harness, which provides it:\n    {HARNESS_HINT} [options]"
        )


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    k = max(1, min(len(sorted_values), -(-len(sorted_values) * q // 100)))
    return sorted_values[int(k) - 1]


def _ids_bytes(token_ids: Any) -> bytes:
    import torch

    return token_ids.to(torch.int64).numpy().tobytes()


def log_digest(log: list[dict[str, Any]]) -> str:
    """A digest of a message log: every entry's role, content and token ids, in order."""
    h = hashlib.blake2b(digest_size=16)
    for entry in log:
        content = entry["content"] if isinstance(entry["content"], str) else json.dumps(entry["content"])
        for part in (entry["role"].encode(), content.encode(), _ids_bytes(entry["token_ids"])):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


def ids_digest(log: list[dict[str, Any]]) -> str:
    """A digest of the log's token ids concatenated (entry boundaries and roles left out)."""
    h = hashlib.blake2b(digest_size=16)
    for entry in log:
        h.update(_ids_bytes(entry["token_ids"]))
    return h.hexdigest()


def make_processor(method: str, tokenizer: Any) -> Callable[[Datum, int], dict[str, Any]]:
    """The processor call of ``method`` with the arguments NeMo-RL's data loader passes (bound here, once)."""
    if method == "nemo_rl":
        from nemo_rl.data.interfaces import TaskDataSpec
        from nemo_rl.data.processors import sft_processor

        nemo_spec = TaskDataSpec(task_name=TASK_NAME)

        def call_nemo(datum: Datum, idx: int) -> dict[str, Any]:
            return sft_processor(datum, nemo_spec, tokenizer, MAX_SEQ_LENGTH, idx, add_bos=True, add_eos=False)

        return call_nemo

    from alia_nemo.nemo_rl.processor import alia_sft_processor

    try:
        from nemo_rl.data.interfaces import TaskDataSpec

        spec: Any = TaskDataSpec(task_name=TASK_NAME)
    except ImportError:
        spec = argparse.Namespace(task_name=TASK_NAME)

    def call_ours(datum: Datum, idx: int) -> dict[str, Any]:
        return alia_sft_processor(datum, spec, tokenizer, MAX_SEQ_LENGTH, idx, add_bos=True, add_eos=False)

    return call_ours


def load_datums(data_dir: Path, with_stored: bool) -> list[Datum]:
    """The datums a method sees: ``messages``, ``id``, ``task_name``; plus the stored ids and hashes if asked."""
    with open(data_dir / "conversations.jsonl", encoding="utf-8") as f:
        datums = [json.loads(line) for line in f]
    if with_stored:
        with open(data_dir / "stored.jsonl", encoding="utf-8") as f:
            for datum, line in zip(datums, f, strict=True):
                datum.update(json.loads(line))
    return datums


# ---------------------------------------------------------------------------------------------------------------
# Child: one method, one timed pass, in a fresh process


def run_child(method: str, data_dir: Path, out: Path, tokenizer_spec: str | None, warmup: int) -> int:
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    if method == "nemo_rl":
        require_nemo_rl()
    tokenizer = load_bench_tokenizer(tokenizer_spec)
    process = make_processor(method, tokenizer)
    import torch  # both processors make tensors; imported before timing in every child alike

    torch.tensor([0])
    startup_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    datums = load_datums(data_dir, with_stored=method == "ours_stored")
    load_s = time.perf_counter() - t1

    from alia_nemo.nemo_rl.processor import stored_tokens_usable

    # The method must take the path it is named for: stored ids usable exactly for ours_stored.
    usable = [stored_tokens_usable(d, tokenizer) for d in datums]
    if any(u != (method == "ours_stored") for u in usable):
        print(f"{method}: stored_tokens_usable is {usable[0]} for some datums; wrong path", file=sys.stderr)
        return 1

    for idx, datum in enumerate(datums[:warmup]):  # untimed: imports, caches, the tokenizer hash
        process(datum, idx)
    gc.collect()
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for idx, datum in enumerate(datums):
        results.append(process(datum, idx))
    seconds = time.perf_counter() - start

    tokens = sum(int(r["length"]) for r in results)
    trained = sum(len(e["token_ids"]) for r in results for e in r["message_log"] if e["role"] == "assistant")
    payload = {
        "method": method,
        "pid": os.getpid(),
        "seconds": seconds,
        "n": len(datums),
        "conversations_per_s": len(datums) / seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "role_trained_tokens": trained,
        "entries": sum(len(r["message_log"]) for r in results),
        "startup_s": startup_s,
        "load_s": load_s,
        "loadavg_1min_start": load0,
        "loadavg_1min_end": os.getloadavg()[0],
        "log_digests": [log_digest(r["message_log"]) for r in results],
        "ids_digests": [ids_digest(r["message_log"]) for r in results],
    }
    out.write_text(json.dumps(payload))
    return 0


def run_profile(data_dir: Path, tokenizer_spec: str | None, warmup: int, top: int) -> str:
    """ours_stored once under cProfile (in this process): the functions that take its time."""
    import cProfile
    import io
    import pstats

    tokenizer = load_bench_tokenizer(tokenizer_spec)
    process = make_processor("ours_stored", tokenizer)
    datums = load_datums(data_dir, with_stored=True)
    for idx, datum in enumerate(datums[:warmup]):
        process(datum, idx)
    profiler = cProfile.Profile()
    profiler.enable()
    for idx, datum in enumerate(datums):
        process(datum, idx)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Parent: data once, children per method per round, figures and checks


def round_order(r: int) -> tuple[str, ...]:
    """The methods in round ``r`` (0-based): :data:`METHODS` rotated left by ``r``."""
    k = r % len(METHODS)
    return METHODS[k:] + METHODS[:k]


def describe(values: Sequence[int]) -> dict[str, float | int]:
    s = sorted(values)
    return {
        "count": len(s),
        "mean": statistics.fmean(s),
        "min": s[0],
        "p50": percentile(s, 50),
        "p95": percentile(s, 95),
        "max": s[-1],
    }


def write_data(
    data_dir: Path, conversations: list[list[Message]], tokenizer: Any, batch_size: int
) -> tuple[list[int], list[int]]:
    """Write the conversations and the ids/masks ``prepare`` stores for them; returns tokens and trained per conv."""
    from alia_nemo.data.cache import tokenizer_hash
    from alia_nemo.model.chatml import tokenize_conversations
    from alia_nemo.nemo_rl.processor import TEMPLATE_SHA256

    tok_sha = tokenizer_hash(tokenizer)
    lengths: list[int] = []
    trained: list[int] = []
    with (
        open(data_dir / "conversations.jsonl", "w", encoding="utf-8") as conv_f,
        open(data_dir / "stored.jsonl", "w", encoding="utf-8") as stored_f,
    ):
        for lo in range(0, len(conversations), batch_size):
            chunk = conversations[lo : lo + batch_size]
            ids = [str(lo + k) for k in range(len(chunk))]
            for cid, messages, tc in zip(ids, chunk, tokenize_conversations(tokenizer, chunk, ids)):
                conv_f.write(json.dumps({"id": cid, "task_name": TASK_NAME, "messages": messages}) + "\n")
                stored = {
                    "input_ids": tc.input_ids,
                    "loss_mask": tc.loss_mask,
                    "prepared_tokenizer_sha256": tok_sha,
                    "prepared_template_sha256": TEMPLATE_SHA256,
                }
                stored_f.write(json.dumps(stored) + "\n")
                lengths.append(len(tc.input_ids))
                trained.append(sum(tc.loss_mask))
    return lengths, trained


def first_id_difference(data_dir: Path, tokenizer: Any, i: int) -> dict[str, Any]:
    """Where NeMo-RL's concatenated ids first depart from ours for conversation ``i`` (a diagnostic, in-process)."""
    datum = load_datums(data_dir, with_stored=False)[i]
    logs = {m: make_processor(m, tokenizer)(dict(datum), i)["message_log"] for m in ("nemo_rl", "ours_retokenise")}
    ids = {m: [int(t) for e in log for t in e["token_ids"].tolist()] for m, log in logs.items()}
    a, b = ids["nemo_rl"], ids["ours_retokenise"]
    k = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {
        "conversation": i,
        "tokens_nemo_rl": len(a),
        "tokens_ours": len(b),
        "first_difference_at": k,
        "nemo_rl_tokens_there": tokenizer.convert_ids_to_tokens(a[max(0, k - 3) : k + 4]),
        "ours_tokens_there": tokenizer.convert_ids_to_tokens(b[max(0, k - 3) : k + 4]),
    }


def machine_info() -> dict[str, Any]:
    import tokenizers
    import torch
    import transformers

    try:
        import nemo_rl

        nemo_version = getattr(nemo_rl, "__version__", "unknown")
    except ImportError:
        nemo_version = None
    cpu_model = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu_model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "node": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "nemo_rl": nemo_version,
        "nemo_rl_source": os.environ.get("NRL_CPU_SRC") or os.environ.get("NRL_SRC"),
    }


def command_line() -> str:
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    prefix = "tests/nemo_rl/harness.sh python" if os.environ.get("NRL_CPU_SRC") else "python"
    return f"{prefix} benchmarks/bench_tokenize_masks.py {args}".rstrip()


def format_table(figures: dict[str, dict[str, Any]]) -> list[str]:
    ref = figures[REFERENCE]["conversations_per_s"]["median"]
    lines = [f"{'method':<17}{'conv/s med':>11}{'tokens/s med':>14}{'vs nemo_rl':>11}   conv/s per round"]
    for method, f in figures.items():
        per_round = "".join(f"{r:>9,.0f}" for r in f["conversations_per_s"]["rounds"])
        lines.append(
            f"{method:<17}{f['conversations_per_s']['median']:>11,.1f}{f['tokens_per_s']['median']:>14,.0f}"
            f"{f['conversations_per_s']['median'] / ref:>10.2f}x  {per_round}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="conversations (default 3000: about 4 minutes on 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; one fresh process per method each")
    parser.add_argument("--tokenizer", help="a real ALIA tokenizer directory (default: the built-in test tokenizer)")
    parser.add_argument("--warmup", type=int, default=20, help="conversations run untimed first in every process")
    parser.add_argument("--batch-size", type=int, default=256, help="conversations per tokenize_conversations call")
    parser.add_argument("--profile", action="store_true", help="profile ours_stored (always done if the target fails)")
    parser.add_argument("--profile-top", type=int, default=25, help="functions listed by the profile")
    parser.add_argument("--json", type=Path, help="write the figures and machine info here")
    parser.add_argument("--txt", type=Path, help="write the human-readable report here")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        return run_child(args.child, args.data, args.out, args.tokenizer, args.warmup)

    require_nemo_rl()
    wall0 = time.perf_counter()
    tokenizer = load_bench_tokenizer(args.tokenizer)
    tokenizer_name = args.tokenizer or f"builtin:test ({len(tokenizer)} pieces)"
    report: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        report.append(line)

    say(f"bench_tokenize_masks {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")
    say(f"command: {command_line()}")
    info = machine_info()
    say(
        f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), Python {info['python']}, transformers "
        f"{info['transformers']}, tokenizers {info['tokenizers']}, torch {info['torch']}, NeMo-RL source "
        f"{info['nemo_rl_source']}"
    )

    t = time.perf_counter()
    conversations = make_conversations(args.n, args.seed)
    messages_per_conv = [len(c) for c in conversations]
    with tempfile.TemporaryDirectory(prefix="bench_tokenize_masks-") as tmp:
        data_dir = Path(tmp)
        lengths, trained = write_data(data_dir, conversations, tokenizer, args.batch_size)
        del conversations
        distribution = {
            "tokens": describe(lengths),
            "trained_tokens_ours": describe(trained),
            "messages": describe(messages_per_conv),
            "messages_histogram": dict(sorted(Counter(messages_per_conv).items())),
            "total_tokens": sum(lengths),
        }
        dt = distribution["tokens"]
        dm = distribution["messages"]
        say(
            f"data: {args.n} conversations (seed {args.seed}), tokenizer {tokenizer_name}; generated, tokenised and "
            f"written in {time.perf_counter() - t:.1f}s"
        )
        say(
            f"tokens per conversation: mean {dt['mean']:,.0f}, p50 {dt['p50']:,}, p95 {dt['p95']:,}, "
            f"max {dt['max']:,} (min {dt['min']:,}; {distribution['total_tokens']:,} in all)"
        )
        say(
            f"messages per conversation: mean {dm['mean']:.2f}, p50 {dm['p50']}, max {dm['max']} "
            f"(histogram {distribution['messages_histogram']})"
        )

        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        for r in range(args.rounds):
            for method in round_order(r):
                out = data_dir / f"{method}-{r}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--data", str(data_dir)]
                cmd += ["--out", str(out), "--warmup", str(args.warmup)]
                cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
                subprocess.run(cmd, check=True)
                result = json.loads(out.read_text())
                result["round"] = r + 1
                runs[method].append(result)
                say(
                    f"  round {r + 1} {method:<16} {result['seconds']:7.2f}s  {result['conversations_per_s']:9,.1f} "
                    f"conv/s  {result['tokens_per_s']:12,.0f} tokens/s  (start {result['startup_s']:.1f}s, load "
                    f"{result['load_s']:.1f}s, load avg {result['loadavg_1min_start']:.1f})"
                )

        # Correctness, from the children's digests.
        ref_logs = runs["ours_retokenise"][0]["log_digests"]
        for method in ("ours_retokenise", "ours_stored"):
            for run in runs[method]:
                bad = [i for i, (a, b) in enumerate(zip(ref_logs, run["log_digests"])) if a != b]
                assert len(run["log_digests"]) == len(ref_logs) and not bad, (
                    f"{method} round {run['round']}: message logs differ from ours_retokenise round 1 on "
                    f"{len(bad)} conversations, first {bad[:5]}"
                )
        for run in runs["nemo_rl"][1:]:
            assert run["ids_digests"] == runs["nemo_rl"][0]["ids_digests"], "nemo_rl is not deterministic across rounds"
        ours_ids = runs["ours_retokenise"][0]["ids_digests"]
        nemo_ids = runs["nemo_rl"][0]["ids_digests"]
        equal = sum(a == b for a, b in zip(nemo_ids, ours_ids))
        differing = [i for i, (a, b) in enumerate(zip(nemo_ids, ours_ids)) if a != b]
        nemo_run, ours_run = runs["nemo_rl"][0], runs["ours_retokenise"][0]
        correctness: dict[str, Any] = {
            "ours_retokenise_equals_ours_stored": True,
            "compared": "every conversation's message log: role, content and token ids of every entry, every round",
            "ours_deterministic_across_rounds": True,
            "nemo_rl_deterministic_across_rounds": True,
            "nemo_rl_concatenated_ids_equal_ours": equal,
            "nemo_rl_concatenated_ids_differ": len(differing),
            "nemo_rl_first_differing": differing[:10],
            "tokens_nemo_rl": nemo_run["tokens"],
            "tokens_ours": ours_run["tokens"],
            "entries_nemo_rl": nemo_run["entries"],
            "entries_ours": ours_run["entries"],
            "trained_tokens_nemo_rl_by_role": nemo_run["role_trained_tokens"],
            "trained_tokens_ours": ours_run["role_trained_tokens"],
            "trained_tokens_ours_stored_mask": sum(trained),
            "masks_note": (
                "not asserted for NeMo-RL: its sft_processor makes one entry per message and NeMo-RL's SFT loop trains "
                "every token of an assistant entry, header '\\n<|im_start|>assistant\\n' included; ours cuts the log "
                "along our loss mask (assistant content + <|im_end|> trained, header untrained), so entries and "
                "role-derived masks differ by design"
            ),
        }
        if differing:
            correctness["nemo_rl_first_difference_detail"] = first_id_difference(data_dir, tokenizer, differing[0])

        profile_text = None
        figures: dict[str, dict[str, Any]] = {}
        for method in METHODS:
            cps = [run["conversations_per_s"] for run in runs[method]]
            tps = [run["tokens_per_s"] for run in runs[method]]
            figures[method] = {
                "conversations_per_s": {"median": statistics.median(cps), "rounds": cps},
                "tokens_per_s": {"median": statistics.median(tps), "rounds": tps},
                "seconds": {"median": statistics.median(r["seconds"] for r in runs[method])},
                "tokens": runs[method][0]["tokens"],
                "rounds": [
                    {k: v for k, v in run.items() if k not in ("log_digests", "ids_digests")} for run in runs[method]
                ],
            }
        ref = figures[REFERENCE]["conversations_per_s"]["median"]
        speedups = {m: figures[m]["conversations_per_s"]["median"] / ref for m in METHODS if m != REFERENCE}
        target_met = speedups["ours_stored"] >= TARGET
        if args.profile or not target_met:
            profile_text = run_profile(data_dir, args.tokenizer, args.warmup, args.profile_top)

    say()
    say(f"median of {args.rounds} rounds, each method in its own fresh process per round; {args.n} conversations")
    for line in format_table(figures):
        say(line)
    say()
    say(
        f"correctness: ours_retokenise == ours_stored on every conversation's message log (roles, contents, "
        f"token ids per entry) in every round; NeMo-RL's concatenated token ids equal ours on {equal:,} of "
        f"{args.n:,} conversations ({len(differing):,} differ)"
    )
    say(
        f"  trained tokens: ours {correctness['trained_tokens_ours']:,} (assistant content + <|im_end|>); NeMo-RL "
        f"by role {correctness['trained_tokens_nemo_rl_by_role']:,} (whole assistant messages, headers included); "
        f"entries: ours {correctness['entries_ours']:,}, NeMo-RL {correctness['entries_nemo_rl']:,}. Masks differ "
        "by design, not asserted."
    )
    if differing:
        say(f"  first NeMo-RL difference: {correctness['nemo_rl_first_difference_detail']}")
    say()
    say(f"speed-up ours_retokenise / nemo_rl: {speedups['ours_retokenise']:.1f}x")
    say(
        f"speed-up ours_stored / nemo_rl: {speedups['ours_stored']:.1f}x (target >= {TARGET:g}x: "
        f"{'MET' if target_met else 'NOT MET'})"
    )
    if profile_text is not None:
        say()
        say("cProfile of ours_stored (one in-process pass):")
        for line in profile_text.rstrip().splitlines():
            say(line)
    wall = time.perf_counter() - wall0
    say(f"\nwhole run {wall:.0f}s")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "tokenize_masks",
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "command": command_line(),
            "machine": info,
            "tokenizer": tokenizer_name,
            "n_conversations": args.n,
            "seed": args.seed,
            "rounds": args.rounds,
            "round_orders": [list(round_order(r)) for r in range(args.rounds)],
            "warmup": args.warmup,
            "processor_arguments": {"max_seq_length": MAX_SEQ_LENGTH, "add_bos": True, "add_eos": False},
            "timed": "the loop of processor calls over all datums, in a fresh process per method per round",
            "length_distribution": distribution,
            "methods": figures,
            "speedups_vs_nemo_rl": speedups,
            "correctness": correctness,
            "target": TARGET,
            "target_met": target_met,
            "profile_ours_stored": profile_text,
            "wall_s": wall,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.txt:
        args.txt.parent.mkdir(parents=True, exist_ok=True)
        args.txt.write_text("\n".join(report) + "\n")
        print(f"wrote {args.txt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
