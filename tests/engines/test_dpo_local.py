"""DPO in the local engine: the loss on hand-made tensors, then ``train_dpo`` (no Ray) on toy pairs built here, then
the real CLI through Ray (slow)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alia_nemo.config.compose import load_config
from alia_nemo.config.resolve import resolve
from alia_nemo.config.schema import DPOSettings
from alia_nemo.data.reader import DataError
from alia_nemo.engines.dpo_training import (
    STATS,
    PairCollator,
    answer_logps,
    attach_reference_logps,
    check_pairs,
    pair_terms,
    train_dpo,
)
from alia_nemo.engines.local import first_and_last
from alia_nemo.model.chatml import tokenize_preferences
from alia_nemo.plots import plot_loss
from tests.helpers import read_jsonl, save_peaked_tiny_model

LOG2 = math.log(2.0)


# --- the loss on hand-made tensors ----------------------------------------------------------------------------------


def _batch(pairs: int = 3, width: int = 7, vocab: int = 11, seed: int = 0):
    """Random logits for 2 x ``pairs`` sequences (chosen, then rejected) with answers of different lengths."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * pairs, width, vocab, generator=g) * 3
    ids = torch.randint(0, vocab, (2 * pairs, width), generator=g)
    mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    for i in range(2 * pairs):
        start, end = 2 + i % 2, width - (i % 3)  # prompt, then the answer; the shorter ones end in padding
        mask[i, start:end] = 1
    return logits, ids, mask


def _manual_logps(logits, ids, mask) -> list[float]:
    """The sum of log p(token | earlier tokens) over each sequence's trained tokens, one position at a time."""
    out = []
    for s in range(ids.shape[0]):
        total = 0.0
        for t in range(1, ids.shape[1]):
            if mask[s, t]:
                total += torch.log_softmax(logits[s, t - 1].double(), -1)[ids[s, t]].item()
        out.append(total)
    return out


def test_answer_logps_sums_the_trained_tokens_log_probabilities():
    logits, ids, mask = _batch()
    total, count = answer_logps(logits, ids, mask)
    assert total.tolist() == pytest.approx(_manual_logps(logits, ids, mask), abs=1e-4)
    assert count.tolist() == mask[:, 1:].sum(1).tolist()


def test_policy_equal_to_reference_gives_log2_and_zero_margin():
    logits, ids, mask = _batch()
    for average in (False, True):
        settings = DPOSettings(beta=0.7, average_log_probs=average)
        total, count = answer_logps(logits, ids, mask)
        ref = total / count if average else total
        terms = pair_terms(logits, ids, mask, ref, settings)
        assert terms.loss.tolist() == pytest.approx([LOG2] * 3, abs=1e-6)
        assert terms.reward_chosen.abs().max() < 1e-6 and terms.reward_rejected.abs().max() < 1e-6
        assert terms.logp_chosen.tolist() == pytest.approx(ref[:3].tolist())


def test_margin_sum_versus_mean_and_the_sft_term():
    logits, ids, mask = _batch()
    total, count = answer_logps(logits, ids, mask)
    mean = total / count
    assert len(set(count.tolist())) > 1  # answers of different lengths: sum and mean really differ
    # The reference is the policy shifted per sequence by a known amount.
    shift = torch.tensor([0.3, -0.2, 1.1, -0.5, 0.4, 0.9])
    for average, logps in ((False, total), (True, mean)):
        beta = 0.5
        terms = pair_terms(logits, ids, mask, logps - shift, DPOSettings(beta=beta, average_log_probs=average))
        margin = beta * (shift[:3] - shift[3:])  # (logp_c - ref_c) - (logp_r - ref_r) = shift_c - shift_r
        stats = terms.stats()
        assert stats[:, STATS.index("rewards/margin")].tolist() == pytest.approx(margin.tolist(), abs=1e-5)
        assert stats[:, STATS.index("rewards/accuracy")].tolist() == [float(m > 0) for m in margin]
        assert terms.loss.tolist() == pytest.approx([math.log1p(math.exp(-m)) for m in margin.tolist()], abs=1e-5)
        assert terms.logp_chosen.tolist() == pytest.approx(logps[:3].tolist(), abs=1e-5)
    # The SFT term: the chosen answer's NLL per token, weighted, on top of the (weighted) preference loss.
    ref = total - shift
    base = pair_terms(logits, ids, mask, ref, DPOSettings(beta=0.5)).loss
    mixed = pair_terms(logits, ids, mask, ref, DPOSettings(beta=0.5, sft_loss_weight=0.25, preference_loss_weight=2))
    assert (mixed.loss - 2 * base).tolist() == pytest.approx((0.25 * -mean[:3]).tolist(), abs=1e-5)
    sft_only = pair_terms(logits, ids, mask, ref, DPOSettings(sft_loss_weight=1, preference_loss_weight=0))
    assert sft_only.loss.tolist() == pytest.approx((-mean[:3]).tolist(), abs=1e-5)


def test_only_trained_tokens_count():
    logits, ids, mask = _batch()
    ref = answer_logps(logits, ids, mask)[0] - torch.linspace(-1, 1, 6)
    settings = DPOSettings(beta=0.3, sft_loss_weight=0.5)
    loss = pair_terms(logits, ids, mask, ref, settings).loss
    # Logits at position p predict token p + 1: those whose next token is untrained (prompt, padding) and the
    # last position (it predicts nothing) must not matter.
    unused = torch.ones_like(mask, dtype=torch.bool)
    unused[:, :-1] = mask[:, 1:] == 0
    noisy = logits + 50 * torch.randn_like(logits) * unused[..., None]
    assert pair_terms(noisy, ids, mask, ref, settings).loss.tolist() == pytest.approx(loss.tolist(), abs=1e-6)
    # ... and the token ids there neither; a trained position's logits do matter.
    other_ids = torch.where(mask.bool(), ids, (ids + 3) % logits.shape[-1])
    assert pair_terms(logits, other_ids, mask, ref, settings).loss.tolist() == pytest.approx(loss.tolist(), abs=1e-6)
    changed = logits.clone()
    changed[0, 2] += 5 * F.one_hot(ids[0, 3], logits.shape[-1])  # token 3 of pair 0's chosen answer is trained
    assert pair_terms(changed, ids, mask, ref, settings).loss[0] < loss[0] - 1e-3


def test_collator_puts_chosen_then_rejected_into_one_padded_batch():
    rows = [
        {"id": "a", "chosen_input_ids": [1, 7, 8], "chosen_loss_mask": [0, 1, 1], "rejected_input_ids": [1, 9],
         "rejected_loss_mask": [0, 1], "ref_chosen_logp": -1.5, "ref_rejected_logp": -2.5, "pair_index": 4},
        {"id": "b", "chosen_input_ids": [1, 6], "chosen_loss_mask": [0, 1], "rejected_input_ids": [1, 5, 5, 5],
         "rejected_loss_mask": [0, 0, 1, 1], "ref_chosen_logp": -3.0, "ref_rejected_logp": -4.0, "pair_index": 9},
    ]  # fmt: skip
    batch = PairCollator(pad_id=3)(rows)
    assert batch["input_ids"].tolist() == [[1, 7, 8, 3], [1, 6, 3, 3], [1, 9, 3, 3], [1, 5, 5, 5]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["ref_logps"].tolist() == [-1.5, -3.0, -2.5, -4.0]
    assert batch["pair_index"].tolist() == [4, 9]
    assert "labels" not in batch  # the Trainer must not count tokens for loss scaling (see make_dpo_trainer)


def test_pairs_the_loss_can_not_use_are_refused_with_their_id():
    good = {"id": "p1", "chosen_input_ids": [1, 2], "chosen_loss_mask": [0, 1], "rejected_input_ids": [1, 3],
            "rejected_loss_mask": [0, 1]}  # fmt: skip
    check_pairs([good], "training")
    with pytest.raises(DataError, match="training preference pair p1 has no trained token in its rejected answer"):
        check_pairs([{**good, "rejected_loss_mask": [1, 0]}], "training")
    with pytest.raises(DataError, match="validation preference pair p1 has 2 chosen tokens but a loss mask of 3"):
        check_pairs([{**good, "chosen_loss_mask": [0, 1, 1]}], "validation")


# --- train_dpo on toy pairs built here --------------------------------------------------------------------------------

# Six languages, 4 subjects x 5 predicates each: 120 sentences. The chosen answer is the sentence; the rejected
# one has its words in reverse order (the same tokens, so only word order tells them apart: a rule about
# sequences, not a token the model could learn to avoid). Every sixth pair is held out for validation: new
# subject-predicate combinations, 20 of them (no multiple of the micro-batch: the last validation batch is partial).
TOY = {
    "ca": ("Escriu una frase sobre", ["El gat", "La nena", "El pare", "La mestra"],
           ["menja peix a la cuina.", "llegeix un llibre nou.", "camina pel parc.", "canta una cançó.",
            "obre la finestra."]),
    "es": ("Escribe una frase sobre", ["El perro", "La niña", "El abuelo", "La doctora"],
           ["come pan en casa.", "lee el periódico.", "corre por la playa.", "escribe una carta.",
            "cierra la puerta."]),
    "en": ("Write a sentence about", ["The dog", "My sister", "The teacher", "Our neighbour"],
           ["drinks tea every morning.", "reads a long book.", "walks to the station.", "paints the old fence.",
            "cooks dinner tonight."]),
    "eu": ("Idatzi esaldi bat honi buruz:", ["Katua", "Neska", "Aita", "Irakaslea"],
           ["etxean dago.", "liburu bat irakurtzen du.", "parkean dabil.", "abesti bat kantatzen du.",
            "leihoa irekitzen du."]),
    "gl": ("Escribe unha frase sobre", ["O can", "A nena", "O avó", "A mestra"],
           ["come peixe na casa.", "le un libro novo.", "camiña polo parque.", "canta unha canción.",
            "abre a xanela."]),
    "pt": ("Escreva uma frase sobre", ["O gato", "A menina", "O pai", "A professora"],
           ["come peixe na cozinha.", "lê um livro novo.", "anda pelo parque.", "canta uma canção.",
            "abre a janela."]),
}  # fmt: skip


def toy_pairs(tok) -> tuple[list[dict], list[dict]]:
    """(100 training, 20 validation) rows in the engine's pair format."""
    pairs, ids = [], []
    for lang, (ask, subjects, predicates) in TOY.items():
        for subject in subjects:
            for predicate in predicates:
                sentence = f"{subject} {predicate}"
                prompt = [{"role": "user", "content": f"{ask} {subject.lower()}."}]
                pairs.append((prompt, sentence, " ".join(reversed(sentence.split()))))
                ids.append(f"{lang}-{len(ids)}")
    rows = [
        {"id": pid, "chosen_input_ids": c.input_ids, "chosen_loss_mask": c.loss_mask,
         "rejected_input_ids": r.input_ids, "rejected_loss_mask": r.loss_mask}
        for pid, (c, r) in zip(ids, tokenize_preferences(tok, pairs, ids))
    ]  # fmt: skip
    return [r for i, r in enumerate(rows) if i % 6 != 5], [r for i, r in enumerate(rows) if i % 6 == 5]


def dpo_stage(cfg, train: list[dict], val: list[dict]):
    """The resolved stage for rows built here (resolve counts the config's data; these rows are others)."""
    stage = resolve(cfg)
    per_epoch = len(train) // stage.global_batch_size
    steps = min(per_epoch * cfg.stage.epochs, cfg.stage.max_steps or per_epoch * cfg.stage.epochs)
    return dataclasses.replace(stage, train_rows=len(train), val_rows=len(val), steps_per_epoch=per_epoch, steps=steps)


def dpo_config(out: Path, *overrides: str):
    return load_config(["stage=dpo_tiny", "data=dpo_sample", f"run.output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, tok):
    """dpo_tiny on the toy pairs from a random alia_tiny, validation every 6 steps: (output dir, metrics)."""
    out = tmp_path_factory.mktemp("dpo_toy")
    train, val = toy_pairs(tok)
    tok.save_pretrained(out / "tok")
    cfg = dpo_config(out, "run.eval_every=6", "run.save_every=1000")
    stage = dpo_stage(cfg, train, val)
    assert (stage.steps, stage.grad_accumulation) == (6 * cfg.stage.epochs, 2)
    return out, stage, train_dpo(cfg, stage, train, val, out / "tok", out, report_to=[])


def test_toy_preferences_are_learned(toy_run):
    out, stage, metrics = toy_run
    rows = read_jsonl(out / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, stage.steps + 1))
    for r in train:
        assert set(STATS) <= set(r) and 0 <= r["rewards/accuracy"] <= 1
        assert r["rewards/margin"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
    # Step 1 is the start model scoring its own pairs: policy == reference.
    assert train[0]["loss"] == pytest.approx(LOG2, abs=1e-5) and abs(train[0]["rewards/margin"]) < 1e-4
    last = train[-1]
    assert last["rewards/margin"] > train[0]["rewards/margin"] + 1.0, (train[0], last)
    assert last["rewards/accuracy"] > 0.9 and last["loss"] < 0.5 * LOG2
    # Validation at steps 6, 12, ... and once more at the end, with the same statistics.
    evals = [r for r in rows if "eval_loss" in r]
    # Every 6 steps, and at the last one once: the final evaluation reuses the scheduled one there.
    assert [r["step"] for r in evals] == sorted({*range(6, stage.steps + 1, 6), stage.steps})
    assert all(set(f"eval_{k}" for k in STATS) <= set(r) for r in evals)
    assert metrics["eval_rewards/accuracy"] > 0.9 and metrics["eval_loss"] < LOG2
    assert metrics["eval_rewards/margin"] > evals[0]["eval_rewards/margin"]
    assert metrics["global_step"] == stage.steps and metrics["grad_accumulation"] == 2

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(out / "final").pad_token_id == 3
    assert (out / "final" / "generation_config.json").is_file()


def test_validation_statistics_are_the_final_models(toy_run, tok):
    """The logged validation numbers are those of final/ scored against the start model, pair by pair."""
    out, _, metrics = toy_run
    _, val = toy_pairs(tok)
    from transformers import AutoModelForCausalLM

    cfg = dpo_config(out)
    from alia_nemo.engines.hf_training import build_model

    reference = attach_reference_logps(build_model(cfg, resolve(cfg)), val, cfg.stage.dpo, 3, batch_pairs=5)
    policy = attach_reference_logps(AutoModelForCausalLM.from_pretrained(out / "final"), val, cfg.stage.dpo, 3, 7)
    beta = cfg.stage.dpo.beta
    margins = [
        beta * ((p["ref_chosen_logp"] - r["ref_chosen_logp"]) - (p["ref_rejected_logp"] - r["ref_rejected_logp"]))
        for p, r in zip(policy, reference)
    ]
    assert len(margins) == 20  # every validation pair, though 20 is no multiple of the micro-batch (8)
    assert metrics["eval_rewards/margin"] == pytest.approx(sum(margins) / 20, rel=1e-4)
    assert metrics["eval_rewards/accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 20)
    expected_loss = sum(math.log1p(math.exp(-m)) for m in margins) / 20
    assert metrics["eval_loss"] == pytest.approx(expected_loss, rel=1e-4)


def test_step_loss_is_the_mean_over_the_global_batch_pairs(tmp_path, tok):
    """Four accumulated micro-batches of 2 pairs: the step's loss (what is back-propagated, and logged) is the
    mean over the 8 pairs, whatever their lengths: with an SFT term on a start model whose token losses vary
    a lot, a mean over tokens or over micro-batch means would be far off."""
    model_dir = save_peaked_tiny_model(tmp_path / "peaked")
    train, _ = toy_pairs(tok)
    train = sorted(train, key=lambda r: len(r["chosen_input_ids"]))[:: len(train) // 8][:8]  # very different lengths
    tok.save_pretrained(tmp_path / "tok")
    cfg = dpo_config(tmp_path / "run", f"model.pretrained={model_dir}", "stage.global_batch_size=8",
                     "stage.micro_batch_size=2", "stage.max_steps=1", "stage.dpo.sft_loss_weight=1.0")  # fmt: skip
    stage = dpo_stage(cfg, train, [])
    assert (stage.grad_accumulation, stage.steps) == (4, 1)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll = []  # per pair: the chosen answer's NLL per token, each pair scored alone
    with torch.no_grad():
        for r in train:
            ids, mask = torch.tensor([r["chosen_input_ids"]]), torch.tensor([r["chosen_loss_mask"]])
            total, count = answer_logps(model(ids).logits, ids, mask)
            nll.append(-(total / count).item())
    pair_mean = LOG2 + sum(nll) / 8
    lengths = [sum(r["chosen_loss_mask"]) for r in train]
    token_mean = LOG2 + sum(n * k for n, k in zip(nll, lengths)) / sum(lengths)
    assert abs(pair_mean - token_mean) > 0.05  # the two schemes are far apart here

    metrics = train_dpo(cfg, stage, train, [], tmp_path / "tok", tmp_path / "run", report_to=[])
    step1 = next(r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r)
    assert step1["step"] == 1 and step1["loss"] == pytest.approx(pair_mean, rel=1e-4)
    assert metrics["global_step"] == 1 and "eval_loss" not in metrics


def test_resumed_run_continues_as_the_uninterrupted_one(tmp_path, tok):
    """Killed after checkpoint-3 (simulated: later files removed), the rerun resumes there, recomputes the
    reference from the start model and ends with the uninterrupted run's weights and margins."""
    train, _ = toy_pairs(tok)
    tok.save_pretrained(tmp_path / "tok")
    out = tmp_path / "run"
    cfg = dpo_config(out, "stage.max_steps=6", "run.save_every=3", "run.keep_checkpoints=null")
    stage = dpo_stage(cfg, train, [])
    train_dpo(cfg, stage, train, [], tmp_path / "tok", out, report_to=[])
    whole = {r["step"]: r["rewards/margin"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}
    shutil.move(out / "final", tmp_path / "uninterrupted")
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")

    metrics = train_dpo(cfg, stage, train, [], tmp_path / "tok", out, report_to=[])
    assert metrics["resumed_from"] == "checkpoint-3" and metrics["global_step"] == 6
    rows = read_jsonl(out / "metrics.jsonl")
    begins = [i for i, r in enumerate(rows) if r.get("event") == "train_begin"]
    resumed = {r["step"]: r["rewards/margin"] for r in rows[begins[1] :] if "loss" in r}
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([whole[s] for s in (4, 5, 6)], abs=1e-4)
    assert whole[6] > 0.1  # the margins compared above are not all ~0

    from safetensors.torch import load_file

    a, b = (
        load_file(str(tmp_path / "uninterrupted" / "model.safetensors")),
        load_file(str(out / "final" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_nonfinite_loss_stops_the_run(tmp_path, tok):
    from alia_nemo.engines import TrainingError
    from tests.helpers import save_nan_tiny_model

    train, _ = toy_pairs(tok)
    tok.save_pretrained(tmp_path / "tok")
    model_dir = save_nan_tiny_model(tmp_path / "nan")
    cfg = dpo_config(tmp_path / "run", f"model.pretrained={model_dir}", "stage.max_steps=3")
    with pytest.raises(TrainingError, match="training loss became nan at step 1"):
        train_dpo(cfg, dpo_stage(cfg, train, []), train, [], tmp_path / "tok", tmp_path / "run", report_to=[])
    assert not (tmp_path / "run" / "final").exists()
    assert json.loads((tmp_path / "run" / "nonfinite.json").read_text())["step"] == 1


def _png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_summary_and_plot_carry_the_reward_margin_and_accuracy(toy_run, tmp_path):
    out, _, _ = toy_run
    rows = read_jsonl(out / "metrics.jsonl")
    found = first_and_last(rows)
    train = [r for r in rows if "loss" in r]
    assert found["first_margin"] == train[0]["rewards/margin"] and found["last_margin"] == train[-1]["rewards/margin"]
    assert found["last_accuracy"] == train[-1]["rewards/accuracy"] and found["first_loss"] == train[0]["loss"]
    assert set(first_and_last([{"step": 1, "loss": 2.0}])) == {"first_loss", "last_loss"}  # SFT: the loss only
    # A DPO run's plot has a second panel (a taller figure); an SFT run's keeps its one panel.
    dpo_png = plot_loss(out / "metrics.jsonl", tmp_path / "dpo.png")
    sft_metrics = tmp_path / "sft.jsonl"
    sft_metrics.write_text("".join(json.dumps({"step": r["step"], "loss": r["loss"]}) + "\n" for r in train))
    sft_png = plot_loss(sft_metrics, tmp_path / "sft.png")
    (dpo_w, dpo_h), (sft_w, sft_h) = _png_size(dpo_png), _png_size(sft_png)
    assert dpo_w == sft_w and dpo_h > 1.5 * sft_h


# --- the real CLI through Ray ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_trains_dpo_tiny_on_the_sample_pairs(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "ALIA_NEMO_PREPARED": str(tmp_path / "prepared")}
    proc = subprocess.run(
        [sys.executable, "-m", "alia_nemo.cli", "train", "stage=dpo_tiny", "data=dpo_sample", f"run.output_dir={out}"],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert " margin " in proc.stdout and " accuracy " in proc.stdout  # the DPO progress line
    summary = json.loads((out / "summary.json").read_text())
    train = summary["train"]
    assert train["last_accuracy"] > 0.9 and train["last_margin"] > train["first_margin"] + 1.0, train
    assert train["eval_rewards/accuracy"] > 0.9 and train["last_loss"] < LOG2
    assert train["global_step"] == summary["resolved"]["steps"]
    assert (out / "final" / "model.safetensors").is_file() and (out / "loss.png").is_file()
    assert any("rewards/margin" in r for r in read_jsonl(out / "metrics.jsonl"))


@pytest.mark.slow
def test_two_workers_share_the_reference_and_count_each_validation_pair_once(tmp_path, tok):
    """DDP over two Ray workers: each scores half the pairs for the reference, training statistics are reduced
    over both, and the 18 validation pairs (no multiple of 2 workers x 8) are padded by distributed evaluation;
    the logged validation numbers still equal final/ scored pair by pair in one process."""
    from transformers import AutoModelForCausalLM

    from alia_nemo.data.sources import load_for_training
    from alia_nemo.engines.hf_training import build_model
    from alia_nemo.engines.local import run_local

    cfg = dpo_config(tmp_path / "run", "engine.num_workers=2", "run.eval_every=17", "stage.epochs=2",
                     f"data.prepared_root={tmp_path / 'prepared'}")  # fmt: skip
    summary = run_local(cfg)
    train = summary["train"]
    assert (train["world_size"], train["grad_accumulation"], train["global_step"]) == (2, 1, 34)
    assert train["first_loss"] == pytest.approx(LOG2, abs=1e-5) and train["last_accuracy"] > 0.9
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r] == [17, 34]

    data, stage = load_for_training(cfg, tok)
    assert len(data.val) == 18
    reference = attach_reference_logps(build_model(cfg, stage), data.val, cfg.stage.dpo, tok.pad_token_id, 8)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    policy = attach_reference_logps(final, data.val, cfg.stage.dpo, tok.pad_token_id, 8)
    beta = cfg.stage.dpo.beta
    margins = [
        beta * ((p["ref_chosen_logp"] - r["ref_chosen_logp"]) - (p["ref_rejected_logp"] - r["ref_rejected_logp"]))
        for p, r in zip(policy, reference)
    ]
    assert train["eval_rewards/margin"] == pytest.approx(sum(margins) / 18, rel=1e-4)
    assert train["eval_loss"] == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / 18, rel=1e-4)
