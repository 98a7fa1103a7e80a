"""Append-only on-disk row stores that keep ``prepare``'s memory flat whatever the data's size.

A build keeps only integer offsets in memory; rows live in files inside its temporary build directory (removed
with it, so an interrupted build leaves nothing behind):

- :class:`ConversationSpill`: converted conversations (JSON lines) that passed the shape and duplicate filters,
  read back by index in the seeded selection order;
- :class:`RowStore`: selected rows, their metadata as JSON lines and their token ids (int32) and loss masks
  (int8) as raw arrays, read back in the final shuffled order when the Parquet shards are written.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Any

import numpy as np


class ConversationSpill:
    """Conversations (dicts of JSON values) appended to one file and read back by index."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offsets = array("q", [0])
        self._w = open(path, "wb")  # noqa: SIM115 - closed by close(); reads reopen it
        self._r: Any = None

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def append(self, conv: dict[str, Any]) -> int:
        """Store ``conv``; returns its index."""
        data = json.dumps(conv, ensure_ascii=False).encode() + b"\n"
        self._w.write(data)
        self._offsets.append(self._offsets[-1] + len(data))
        return len(self._offsets) - 2

    def get(self, index: int) -> dict[str, Any]:
        """The conversation stored at ``index``."""
        self._w.flush()  # a no-op unless rows were appended since the last read
        if self._r is None:
            self._r = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        start = self._offsets[index]
        self._r.seek(start)
        return json.loads(self._r.read(self._offsets[index + 1] - start))

    def close(self) -> None:
        """Close the file and delete it (the spill is scratch space of one build)."""
        for f in (self._w, self._r):
            if f is not None:
                f.close()
        self.path.unlink(missing_ok=True)


class RowStore:
    """Tokenised rows: metadata (``id``, ``source``, ``language``, ``messages`` as JSON) and ids + masks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._meta = ConversationSpill(path.with_suffix(".meta.jsonl"))
        self._tokens_path = path.with_suffix(".tokens")
        self._tokens = open(self._tokens_path, "wb")  # noqa: SIM115 - closed by close()
        self._token_offsets = array("q", [0])  # in tokens
        self._r: Any = None

    def __len__(self) -> int:
        return len(self._meta)

    def append(self, meta: dict[str, Any], input_ids: np.ndarray, loss_mask: np.ndarray) -> int:
        """Store a row; ``input_ids`` int32 and ``loss_mask`` int8 of the same length. Returns its index."""
        self._tokens.write(input_ids.astype(np.int32, copy=False).tobytes())
        self._tokens.write(loss_mask.astype(np.int8, copy=False).tobytes())
        self._token_offsets.append(self._token_offsets[-1] + len(input_ids))
        return self._meta.append(meta)

    def length(self, index: int) -> int:
        """Tokens of row ``index``."""
        return self._token_offsets[index + 1] - self._token_offsets[index]

    def get(self, index: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """Row ``index``: its metadata, token ids (int32) and loss mask (int8)."""
        self._tokens.flush()  # a no-op unless rows were appended since the last read
        if self._r is None:
            self._r = open(self._tokens_path, "rb")  # noqa: SIM115 - closed by close()
        start, n = self._token_offsets[index], self.length(index)
        self._r.seek(5 * start)  # each earlier token took 4 bytes of id and 1 of mask
        data = self._r.read(5 * n)
        ids = np.frombuffer(data, dtype=np.int32, count=n)
        mask = np.frombuffer(data, dtype=np.int8, offset=4 * n, count=n)
        return self._meta.get(index), ids, mask

    def close(self) -> None:
        """Close and delete the store's files."""
        self._meta.close()
        for f in (self._tokens, self._r):
            if f is not None:
                f.close()
        self._tokens_path.unlink(missing_ok=True)
