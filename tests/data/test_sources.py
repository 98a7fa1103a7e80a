"""The data-source registry (the one dispatch on data configs) and the cache's code hash over the import graph."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from alia_nemo.config.compose import load_config
from alia_nemo.config.resolve import resolve
from alia_nemo.config.schema import DATA_FORMATS
from alia_nemo.data import cache
from alia_nemo.data.sources import SOURCES, source_for
from alia_nemo.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[2] / "alia_nemo"
DATA_CLASSES = {"DataConfig", "MixtureConfig", "TextCorpusConfig", "PreferenceConfig"}


def test_every_data_format_has_one_source_that_feeds_its_stage_kind():
    assert set(SOURCES) == set(DATA_FORMATS)
    assert {f: s.stage_kind for f, s in SOURCES.items()} == {
        "messages_jsonl": "sft",
        "mixture": "sft",
        "text_corpus": "cpt",
        "preference": "dpo",
    }
    assert {f for f, s in SOURCES.items() if s.cached} == {"mixture", "text_corpus", "preference"}


def dispatches_on_data_configs(root: Path) -> list[str]:
    """``isinstance(x, <data config class>)`` and ``data.format == ...`` outside ``data/sources.py``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix() == "data/sources.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                if names & DATA_CLASSES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} isinstance on {sorted(names & DATA_CLASSES)}")
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "format":
                owner = node.left.value
                if isinstance(owner, ast.Attribute) and owner.attr == "data":
                    found.append(f"{path.relative_to(root)}:{node.lineno} compares data.format")
    return found


def test_no_dispatch_on_data_configs_outside_the_registry(tmp_path):
    assert dispatches_on_data_configs(PACKAGE) == []
    # and the check finds one when there is one
    (tmp_path / "engine.py").write_text(
        "def f(cfg):\n    if isinstance(cfg.data, (schema.MixtureConfig, int)):\n        return 1\n"
        "    return cfg.data.format == 'mixture'\n"
    )
    assert dispatches_on_data_configs(tmp_path) == [
        "engine.py:2 isinstance on ['MixtureConfig']",
        "engine.py:4 compares data.format",
    ]


def test_plain_jsonl_is_refused_by_prepare_with_the_way_out():
    cfg = load_config(["data=jsonl", "data.files=[x.jsonl]"])
    with pytest.raises(ConfigError, match=r"format messages_jsonl, which `train` on the local engine tokenises"):
        source_for(cfg.data).prepare(cfg, resolve(cfg), tokenizer=None)


def test_a_cpt_corpus_without_a_budget_says_what_to_set():
    cfg = load_config(["data=cpt_sample", "stage=cpt_32k_tiny", "stage.token_budget=null", "stage.max_steps=null"])
    r = resolve(cfg)
    assert (r.train_tokens, r.train_rows, r.steps) == (None, None, None)
    with pytest.raises(ConfigError, match=r"needs stage.token_budget or stage.max_steps"):
        source_for(cfg.data).plan(cfg, r)


def test_code_hash_covers_every_module_the_artifact_imports(monkeypatch, tmp_path):
    packing = cache.package_modules("alia_nemo.data.packing")
    # the packer, the corpus reader it streams from, the shared reader, the cache itself (configs enter as data)
    assert {"alia_nemo.data.packing", "alia_nemo.data.corpus", "alia_nemo.data.reader", "alia_nemo.data.cache"} <= set(
        packing
    )
    assert not [m for m in packing if m.startswith("alia_nemo.config")]
    assert "alia_nemo.data.corpus" not in cache.package_modules("alia_nemo.data.mixture")
    assert not {m for m in packing if m.startswith(("alia_nemo.engines", "alia_nemo.launch", "alia_nemo.cli"))}

    before = {m: cache.code_version(m) for m in ("alia_nemo.data.packing", "alia_nemo.data.mixture")}
    edited = tmp_path / "corpus.py"
    edited.write_text(cache.module_file("alia_nemo.data.corpus").read_text() + "\n# an edit\n")
    real = cache.module_file
    monkeypatch.setattr(cache, "module_file", lambda name: edited if name == "alia_nemo.data.corpus" else real(name))
    assert cache.code_version("alia_nemo.data.packing") != before["alia_nemo.data.packing"]  # packed corpora rebuilt
    assert cache.code_version("alia_nemo.data.mixture") == before["alia_nemo.data.mixture"]  # mixtures kept
