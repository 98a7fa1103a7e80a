"""A full prepare of a synthetic stand-in for all 20 sources of the card's mixture (>= 20,000 conversations).

Public sources get raw rows in their own schema (Parquet, through their adapters); internal sources
get messages-JSONL files. The card's counts are scaled down; the manifest must balance exactly.
"""

from __future__ import annotations

import json
import math

import pytest

from alia_nemo.data.adapters import ONE_TO_ONE_ADAPTERS
from alia_nemo.data.mixture import load_prepared, prepare_mixture
from tests.source_fixtures import synthetic_mixture

SCALE = 0.03


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_mixture(tmp_path_factory.mktemp("synthetic"), SCALE)


@pytest.mark.slow  # 20 sources, tens of thousands of rows: most of the fast suite's time if left unmarked
def test_full_synthetic_prepare_balances(synthetic, tok):
    requested = sum(sum(d.counts.values()) for d in synthetic.datasets.values())
    assert requested >= 20_000 and len(synthetic.datasets) == 20
    out = prepare_mixture(synthetic, tok, 32_768, seed=0, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["totals"]
    assert totals["requested"] == requested
    assert totals["requested"] == totals["selected"] + totals["shortfall"] + totals["repeated"]
    assert totals["shortfall"] == 0 and totals["repeated"] == 0 and totals["val_shortfall"] == 0
    for name, report in manifest["datasets"].items():
        entry = synthetic.datasets[name]
        for lang, s in report["languages"].items():
            assert s["selected"] == entry.counts[lang], (name, lang, s)
            assert s["val"] == s["val_requested"] == math.ceil(entry.counts[lang] * 0.01) and not s["val_shortfall"]
            # every converted conversation is selected, held out, dropped with a reason, or unused
            assert s["converted"] == s["selected"] + s["val"] + sum(s["dropped"].values()) + s["unselected"]
        if entry.adapter in ONE_TO_ONE_ADAPTERS:
            converted = sum(s["converted"] for s in report["languages"].values())
            # every input row became a conversation or was dropped by its adapter with a reason
            assert report["input_rows"] == converted + sum(report["adapter_drops"].values()), name
        assert report["tokens"]["count"] == sum(entry.counts.values())
    train, val, _ = load_prepared(out)
    assert len(train) == requested and len(val) == totals["val"]
    assert all(any(label != -100 for label in row["labels"]) for row in train[:500])
    # rerunning with identical inputs is a cache hit
    assert prepare_mixture(synthetic, tok, 32_768, seed=0, progress=False) == out
