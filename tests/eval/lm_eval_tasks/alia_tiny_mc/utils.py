"""Dataset loader for the ``alia_tiny_mc`` tasks (``custom_dataset`` in ``_template_yaml``).

lm-eval resolves a task's ``data_files`` against the working directory, not the YAML's folder, so a plain
``dataset_path: json`` would only work when run from one particular directory. Loading ``items.jsonl`` next to this
file works from anywhere and never touches the hub or the datasets cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

ITEMS = Path(__file__).with_name("items.jsonl")


def load(language: str, **_: Any) -> datasets.DatasetDict:
    """The items of one ``language`` as a ``test`` split; lm-eval also passes its metadata, which is ignored."""
    rows = [json.loads(line) for line in ITEMS.read_text(encoding="utf-8").splitlines() if line.strip()]
    picked = [r for r in rows if r["language"] == language]
    if not picked:
        raise ValueError(f"{ITEMS} has no items with language={language!r}")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(picked)})
