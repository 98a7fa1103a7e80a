"""Which dataset kept each conversation so far, in 32 bytes a conversation (the mixture's duplicate filter).

A dict of a million digests costs over 100 MB of Python objects; here a finished dataset's digests are one
sorted fixed-width array (numpy ``S32``), searched a batch at a time, and only the dataset being read is a dict.
Exact: whole sha256 digests, nothing truncated or hashed again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class SeenDigests:
    """Content digests kept so far, with the dataset that kept each (at most one: a digest is kept once)."""

    def __init__(self) -> None:
        self._done: list[tuple[str, np.ndarray]] = []  # (dataset, its digests sorted), in the order read
        self._name: str | None = None
        self._open: dict[bytes, None] = {}

    def __len__(self) -> int:
        return sum(len(a) for _, a in self._done) + len(self._open)

    def start(self, name: str) -> None:
        """Begin a dataset: digests added from now on are ``name``'s."""
        self.finish()
        self._name = name

    def finish(self) -> None:
        """Freeze the current dataset's digests into a sorted array."""
        if self._name is not None and self._open:
            self._done.append((self._name, np.array(sorted(self._open), dtype="S32")))
        self._name, self._open = None, {}

    def kept_before(self, digests: Sequence[bytes]) -> list[str | None]:
        """For each digest, the finished dataset that kept it, or None (one vectorised search per dataset)."""
        found: list[str | None] = [None] * len(digests)
        if not digests or not self._done:
            return found
        batch = np.array(digests, dtype="S32")  # fixed width on both sides: compared as 32 raw bytes
        for name, kept in self._done:
            at = np.minimum(np.searchsorted(kept, batch), len(kept) - 1)
            for i in np.flatnonzero(kept[at] == batch):
                found[i] = name
        return found

    def add(self, digest: bytes) -> str | None:
        """Keep ``digest`` for the current dataset unless it already kept it; returns the current dataset's name if
        it did (a duplicate within the dataset), else None. Finished datasets are checked by :meth:`kept_before`."""
        if digest in self._open:
            return self._name
        self._open[digest] = None
        return None
