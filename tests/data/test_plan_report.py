"""`prepare --dry-run` shows where every dataset or source is read from, and explains its marks under the table."""

from __future__ import annotations

import json

from alia_nemo.cli import main
from alia_nemo.sample_data import sample_path


def _dry_run(capsys, *overrides: str) -> str:
    assert main(["prepare", *overrides, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_mixture_plan_shows_paths_and_explains_missing(capsys):
    out = _dry_run(capsys, "data=sft_mixture")
    table, _, legend = out.partition("\nMISSING: ")
    assert "from" in table and "hub CohereForAI/aya_dataset" in table and "hub projecte-aina/dolly3k_ca" in table
    assert "hub openlanguagedata/flores_plus" in table and "spa_Latn +3" in table  # six configs, three shown
    assert "eif-augmentation (MISSING)" in table and "(not found)" in table
    lines = legend.splitlines()
    assert lines[0] == "9 dataset(s) read local files that are not at the paths shown (marked (not found)):"
    assert "  eif-augmentation: data/internal/eif-augmentation.jsonl" in lines  # whole, whatever the table folds
    assert "  wildchat-curated-deepseekv3: data/internal/wildchat-curated-deepseekv3.jsonl" in lines
    text = " ".join(lines)
    assert "looked for under data.internal_dir (data/internal)" in text
    assert "Fix: data.internal_dir=DIR" in text and "data.allow_missing_internal=true" in text


def test_mixture_plan_legend_follows_the_settings(capsys, tmp_path):
    internal = tmp_path / "internal"
    out = _dry_run(capsys, "data=sft_mixture", f"data.internal_dir={internal}", "data.allow_missing_internal=true",
                   "data.exclude_licenses=[CC-BY-NC-4.0]")  # fmt: skip
    assert f"looked for under data.internal_dir ({internal})" in out and f"  self-identity: {internal}/" in out
    assert "it is set, so prepare builds without them" in out
    assert "no-robots (excluded)" in out
    assert "(excluded): the dataset's licence is in data.exclude_licenses; its conversations are not in" in out


def test_a_plan_with_nothing_missing_has_no_legend(capsys):
    out = _dry_run(capsys)  # the bundled sample: one local file, present
    assert str(sample_path("sft_sample.jsonl")) in out and "MISSING" not in out and "(not found)" not in out


def test_preference_plan_shows_hub_ids_and_exclusions(capsys):
    out = _dry_run(capsys, "stage=dpo", "data=preference_mixture", "data.exclude_licenses=[MIT]")
    assert "hub nvidia/HelpSteer3 (preference)" in out
    assert "ultrafeedback-binarized (excluded)" in out and "split train_prefs" in out
    assert "its pairs are not in the totals" in out and "MISSING" not in out


def test_corpus_plan_is_a_table_with_paths_and_explains_missing(capsys, monkeypatch, tmp_path):
    out = _dry_run(capsys, "stage=cpt_32k_tiny", "data=cpt_sample")
    assert "corpus cpt_sample" in out and str(sample_path("cpt_sample_ca.jsonl")) in out and "MISSING" not in out
    monkeypatch.setenv("ALIA_NEMO_CPT_DATA", str(tmp_path / "nowhere"))
    out = _dry_run(capsys, "stage=cpt_32k", "data=long_context")
    table, _, legend = out.partition("\nMISSING: ")
    assert "long_documents (MISSING)" in table and "(not found)" in table
    lines = legend.splitlines()
    assert lines[0] == "1 source(s) name files or glob patterns that match no file (marked (not found)):"
    assert lines[1] == f"  long_documents: {tmp_path / 'nowhere'}/*.parquet"
    assert "data.sources.NAME.files=" in legend and "ALIA_NEMO_CPT_DATA" in legend


def test_json_plans_carry_what_the_legend_reads(capsys, tmp_path, monkeypatch):
    assert main(["prepare", "data=sft_mixture", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["internal_dir"] == "data/internal" and plan["allow_missing_internal"] is False
    monkeypatch.setenv("ALIA_NEMO_CPT_DATA", str(tmp_path))
    assert main(["prepare", "stage=cpt_32k", "data=long_context", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing_files"] == {"long_documents": [f"{tmp_path}/*.parquet"]}
