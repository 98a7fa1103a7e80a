"""Throughput of tokenisation + assistant-only loss masking: ours against the naive per-message way.

Both methods turn the same generated chat conversations into token ids and a loss mask (1 on the
tokens of assistant content and its ``<|im_end|>``, 0 elsewhere), and the benchmark asserts that
their outputs are identical for every conversation before it prints any rate.

  ours      ``alia_nemo.model.chatml.tokenize_conversation``: one render and one tokenizer call per
            conversation; character offsets map the trained spans onto tokens.
  batched   ``alia_nemo.model.chatml.tokenize_conversations`` over ``--batch-size`` conversations: what
            ``alia-nemo prepare`` runs (one batched call into the Rust tokenizer).
  naive     the per-message way of NeMo-RL's SFT processor, re-implemented: for message i render
            ``apply_chat_template(messages[:i+1])``, find where it departs from the previous rendering
            by scanning characters, tokenise that chunk on its own into a tensor, and mark it trained
            when the message is the assistant's. For an identical mask only the chunk's content +
            ``<|im_end|>`` tokens are trained (offsets on the chunk), not its header.

Target: ours >= 5x the naive conversations/s on the same inputs.

    python benchmarks/bench_tokenize_masks.py [--n 10000] [--seed 0] [--tokenizer PATH] [--json OUT]

``--tokenizer`` takes a real ALIA tokenizer directory; the default is the built-in 1,024-piece test
tokenizer with ALIA's layout (``alia_nemo.model.tokenizer.build_test_tokenizer``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from alia_nemo.model.chatml import IM_END, IM_START, tokenize_conversation, tokenize_conversations

TARGET = 5.0

Message = dict[str, str]
Result = tuple[list[int], list[int]]  # (input_ids, loss_mask)

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


def run_ours(tokenizer, conversations: Sequence[list[Message]]) -> list[Result]:
    out = []
    for i, messages in enumerate(conversations):
        tc = tokenize_conversation(tokenizer, messages, str(i))
        out.append((tc.input_ids, tc.loss_mask))
    return out


def make_run_batched(batch_size: int) -> Callable[[object, Sequence[list[Message]]], list[Result]]:
    """Our production path in the mixture build: ``tokenize_conversations`` over batches of conversations."""

    def run_batched(tokenizer, conversations: Sequence[list[Message]]) -> list[Result]:
        out: list[Result] = []
        for lo in range(0, len(conversations), batch_size):
            chunk = conversations[lo : lo + batch_size]
            ids = [str(lo + k) for k in range(len(chunk))]
            out += [(tc.input_ids, tc.loss_mask) for tc in tokenize_conversations(tokenizer, chunk, ids)]
        return out

    return run_batched


def first_difference(a: str, b: str) -> int:
    """Index of the first differing character (a character-by-character scan, as the per-message method does)."""
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return min(len(a), len(b))


def run_naive(tokenizer, conversations: Sequence[list[Message]]) -> list[Result]:
    out = []
    for messages in conversations:
        ids: list[int] = []
        mask: list[int] = []
        previous = ""
        for i, message in enumerate(messages):
            # As NeMo-RL's SFT processor does it: render the prefix, find where it departs from the previous
            # rendering by scanning characters, tokenise that chunk into a tensor.
            rendered = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            chunk = rendered[first_difference(previous, rendered) :]
            previous = rendered
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
            chunk_ids = enc["input_ids"][0].tolist()
            ids += chunk_ids
            if message["role"] == "assistant":
                # Trained: tokens covering the content + <|im_end|>, i.e. the chunk after its header.
                start, end = len(chunk) - len(message["content"]) - len(IM_END), len(chunk)
                mask += [int(a < end and b > start) for a, b in enc["offset_mapping"][0].tolist()]
            else:
                mask += [0] * len(chunk_ids)
        out.append((ids, mask))
    return out


def time_method(
    fn: Callable[[object, Sequence[list[Message]]], list[Result]],
    tokenizer,
    conversations: Sequence[list[Message]],
    warmup: int,
    repeats: int,
) -> tuple[float, list[Result]]:
    """Best-of-``repeats`` wall time of ``fn`` over the whole set, after a warm-up on the first few."""
    fn(tokenizer, conversations[:warmup])
    best, result = float("inf"), []
    for _ in range(repeats):
        result = []
        gc.collect()
        start = time.perf_counter()
        result = fn(tokenizer, conversations)
        best = min(best, time.perf_counter() - start)
    return best, result


def first_mismatch(reference: list[Result], other: list[Result]) -> int | None:
    if len(reference) != len(other):
        return min(len(reference), len(other))
    for i, (ref, got) in enumerate(zip(reference, other)):
        if ref != got:
            return i
    return None


def report_mismatch(name: str, tokenizer, conversations, reference: list[Result], other: list[Result], i: int) -> None:
    print(f"\nMISMATCH: {name} differs from ours on conversation {i}", file=sys.stderr)
    if i >= min(len(reference), len(other)):
        print(f"  {len(other)} results against {len(reference)}", file=sys.stderr)
        return
    (ref_ids, ref_mask), (ids, mask) = reference[i], other[i]
    print(f"  tokens: ours {len(ref_ids)}, {name} {len(ids)}", file=sys.stderr)
    for label, a, b in (("input_ids", ref_ids, ids), ("loss_mask", ref_mask, mask)):
        k = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if a != b:
            lo, hi = max(0, k - 5), k + 6
            print(f"  {label} first differ at token {k}", file=sys.stderr)
            print(f"    ours : {tokenizer.convert_ids_to_tokens(ref_ids[lo:hi])} {ref_mask[lo:hi]}", file=sys.stderr)
            print(f"    {name:5s}: {tokenizer.convert_ids_to_tokens(ids[lo:hi])} {mask[lo:hi]}", file=sys.stderr)
    print(json.dumps(conversations[i], ensure_ascii=False, indent=1)[:4000], file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="conversations (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="a real ALIA tokenizer directory (default: the built-in test tokenizer)")
    parser.add_argument("--batch-size", type=int, default=256, help="conversations per call of the batched variant")
    parser.add_argument("--warmup", type=int, default=20, help="conversations run untimed first")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per method; the best counts")
    parser.add_argument("--json", type=Path, help="write the figures and machine info here")
    args = parser.parse_args(argv)

    from alia_nemo.model.tokenizer import build_test_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else build_test_tokenizer()
    tokenizer_name = args.tokenizer or f"builtin:test ({len(tokenizer)} pieces)"

    start = time.perf_counter()
    conversations = make_conversations(args.n, args.seed)
    n_messages = sum(len(c) for c in conversations)
    n_words = sum(len(m["content"].split()) for c in conversations for m in c)
    print(
        f"{len(conversations)} conversations, {n_messages} messages, {n_words} words "
        f"(generated in {time.perf_counter() - start:.1f}s); tokenizer {tokenizer_name}"
    )

    methods: list[tuple[str, Callable]] = [
        ("ours", run_ours),
        (f"batched({args.batch_size})", make_run_batched(args.batch_size)),
        ("naive", run_naive),
    ]
    figures: dict[str, dict] = {}
    reference: list[Result] = []
    for name, fn in methods:
        seconds, result = time_method(fn, tokenizer, conversations, args.warmup, args.repeats)
        tokens = sum(len(ids) for ids, _ in result)
        trained = sum(sum(mask) for _, mask in result)
        figures[name] = {
            "seconds": seconds,
            "conversations_per_s": len(conversations) / seconds,
            "tokens_per_s": tokens / seconds,
            "tokens": tokens,
            "trained_tokens": trained,
        }
        print(f"  timed {name}: {seconds:.2f}s")
        if name == "ours":
            reference = result
            continue
        bad = first_mismatch(reference, result)
        if bad is not None:
            report_mismatch(name.split("(")[0], tokenizer, conversations, reference, result, bad)
            return 1
        del result

    print(f"\nall {len(conversations)} conversations: identical input_ids and loss masks in every method\n")
    print(f"{'method':<16}{'conv/s':>12}{'tokens/s':>14}{'tokens':>14}{'trained':>14}{'seconds':>10}")
    for name, f in figures.items():
        print(
            f"{name:<16}{f['conversations_per_s']:>12,.1f}{f['tokens_per_s']:>14,.0f}"
            f"{f['tokens']:>14,}{f['trained_tokens']:>14,}{f['seconds']:>10.2f}"
        )
    batched_name = methods[1][0]
    speedup = figures["ours"]["conversations_per_s"] / figures["naive"]["conversations_per_s"]
    speedup_batched = figures[batched_name]["conversations_per_s"] / figures["naive"]["conversations_per_s"]
    print(f"\nspeed-up ours/naive: {speedup:.1f}x (target >= {TARGET:g}x)")
    print(f"speed-up {batched_name}/naive: {speedup_batched:.1f}x")

    if args.json:
        import tokenizers
        import transformers

        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "tokenize_masks",
            "machine": {
                "node": platform.node(),
                "platform": platform.platform(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
            },
            "tokenizer": tokenizer_name,
            "n_conversations": len(conversations),
            "n_messages": n_messages,
            "n_words": n_words,
            "seed": args.seed,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "batch_size": args.batch_size,
            "identical_outputs": True,
            "methods": figures,
            "speedup_ours_over_naive": speedup,
            "speedup_batched_over_naive": speedup_batched,
            "target": TARGET,
            "target_met": speedup >= TARGET,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
