"""lm-evaluation-harness end to end: ``alia-nemo eval harness`` runs lm-eval's own code on a tiny export over a
six-language multiple-choice group shipped in ``lm_eval_tasks/``, and every score is checked against
log-likelihoods computed here with transformers, so wrong wiring (model, tokenizer, task, language) fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval comes with the test extra: pip install -e '.[test]'")

TASKS = Path(__file__).parent / "lm_eval_tasks"
ITEMS = TASKS / "alia_tiny_mc" / "items.jsonl"
GROUP = "alia_tiny_mc"
LANGUAGES = ["ca", "en", "es", "eu", "gl", "pt"]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tok) -> Path:
    """A randomly initialised alia_tiny with the test tokenizer, through ``export`` like a trained model."""
    from alia_nemo.model.export import export
    from tests.helpers import save_peaked_tiny_model

    run = tmp_path_factory.mktemp("run")
    # Sharpened logits: choices' log-likelihoods differ by whole nats, so no accuracy hinges on a rounding tie.
    save_peaked_tiny_model(run / "final")
    tok.save_pretrained(str(run / "final"))
    return export(run, tmp_path_factory.mktemp("export") / "hf")


@pytest.fixture(scope="module")
def harness_run(tiny_export, tmp_path_factory) -> tuple[Path, str]:
    """``alia-nemo eval harness`` as a user runs it (its console script); returns (--out, its stdout)."""
    out = tmp_path_factory.mktemp("harness")
    env = {
        **os.environ,
        # Everything is local: offline, and an unreachable hub address so an attempt fails rather than downloads.
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path_factory.mktemp("hf_home")),  # the datasets cache lands here, not in ~/.cache
        # The environment's bin/ off PATH, as for an alia-nemo started by its full path: lm-eval is still found.
        "PATH": os.defpath,
    }
    cli = Path(sys.executable).with_name("alia-nemo")
    cmd = [str(cli), "eval", "harness", "--model", str(tiny_export), "--tasks", GROUP, "--include-path", str(TASKS),
           "--device", "cpu", "--batch-size", "8", "--dtype", "float32", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def expected_scores(model_dir: Path) -> dict[str, dict]:
    """Per language: each item's choice log-likelihoods and the accuracy of their argmax, with plain transformers.

    A choice's score is the summed log-probability of the tokens of " <choice>" after the question: the tokens of
    question + " " + choice past those of the question alone, which must be a prefix of them.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows = [json.loads(line) for line in ITEMS.read_text(encoding="utf-8").splitlines() if line.strip()]
    scores: dict[str, dict] = {lang: {"logliks": {}, "correct": []} for lang in LANGUAGES}
    with torch.no_grad():
        for row in rows:
            context = tok(row["question"]).input_ids
            logliks = []
            for choice in row["choices"]:
                ids = tok(row["question"] + " " + choice).input_ids
                assert ids[: len(context)] == context, f"{row['id']}: the question's tokens change before {choice!r}"
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
                logliks.append(sum(logp[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
            best = max(range(len(logliks)), key=logliks.__getitem__)
            scores[row["language"]]["logliks"][row["id"]] = logliks
            scores[row["language"]]["correct"].append(best == row["answer"])
    for s in scores.values():
        s["acc"] = sum(s["correct"]) / len(s["correct"])
    return scores


def test_lm_eval_scores_each_language_as_transformers_does(harness_run, tiny_export):
    out, stdout = harness_run
    files = list(out.glob("*/results_*.json"))
    assert len(files) == 1, f"expected one lm-eval results file under {out}, found {files}"
    assert f"[alia-nemo] results {files[0]}" in stdout
    results = json.loads(files[0].read_text())
    assert results["configs"][f"{GROUP}_ca"]["num_fewshot"] == 0

    expected = expected_scores(tiny_export)
    accs = {lang: expected[lang]["acc"] for lang in LANGUAGES}
    # Languages with different scores, so a run that mixed up the languages' tasks could not pass.
    assert len(set(accs.values())) > 2, f"the tiny model scores too evenly to tell languages apart: {accs}"
    for lang in LANGUAGES:
        task = f"{GROUP}_{lang}"
        n = len(expected[lang]["correct"])
        assert results["n-samples"][task] == {"original": n, "effective": n}, task
        assert results["results"][task]["acc,none"] == pytest.approx(accs[lang], abs=1e-9), task
        # Each choice's log-likelihood as lm-eval logged it, item by item.
        samples = next(out.glob(f"*/samples_{task}_*.jsonl")).read_text(encoding="utf-8").splitlines()
        logged = {s["doc"]["id"]: [float(r[0]) for r in s["filtered_resps"]] for s in map(json.loads, samples)}
        assert logged.keys() == expected[lang]["logliks"].keys(), task
        for item, logliks in expected[lang]["logliks"].items():
            assert logged[item] == pytest.approx(logliks, rel=1e-4, abs=1e-3), item
    total = sum(len(expected[lang]["correct"]) for lang in LANGUAGES)
    overall = sum(sum(expected[lang]["correct"]) for lang in LANGUAGES) / total
    assert results["results"][GROUP]["acc,none"] == pytest.approx(overall, abs=1e-9)
