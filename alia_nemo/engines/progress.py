"""Throughput and time left for the progress lines of both engines (``[alia-nemo] step N/M loss ... | tok/s | ETA``).

Measured from this attempt only (a resumed run starts counting at its checkpoint), and from the end of its first
step on: that step carries the warm-up (model set-up, the first batches) and would make the first estimate
several times too long. Tokens per second cover the interval since the previous progress line, so a slow-down
shows at once; the ETA uses the mean time per step since the anchor, which already includes the evaluations and
checkpoints a run does on the way. The last line says how long the attempt took instead.
"""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h03m``, ``1d04h``: short and readable at a glance."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Progress:
    """Rates of one training attempt: :meth:`begin` when it starts, then :meth:`suffix` for each progress line."""

    def __init__(self, total_steps: int, clock=time.monotonic):
        self.total = total_steps
        self.clock = clock
        self._began: tuple[float, int] | None = None  # (time, step) when the attempt began
        self._anchor: tuple[float, int] | None = None  # (time, step) the ETA measures from
        self._last: tuple[float, float] | None = None  # (time, tokens) at the previous line

    def begin(self, step: int, tokens: float = 0.0) -> None:
        """The attempt starts at ``step`` (its checkpoint's after a resume) having seen ``tokens`` tokens."""
        now = self.clock()
        self._began = self._anchor = (now, step)
        self._last = (now, float(tokens))

    def suffix(self, step: int, tokens: float | None = None) -> str:
        """`` | 12,345 tok/s | ETA 3m05s`` at ``step`` with ``tokens`` seen in all (None: not counted)."""
        if self._began is None:
            self.begin(step - 1, tokens or 0.0)
        now = self.clock()
        (began, first), (anchor_time, anchor_step), (last_time, last_tokens) = self._began, self._anchor, self._last
        if tokens is not None:
            self._last = (now, float(tokens))
        warm_up = step == first + 1 and step < self.total  # the first step: rates measured from its end
        parts = []
        if not warm_up and tokens is not None and tokens > last_tokens and now > last_time:
            parts.append(f"{(tokens - last_tokens) / (now - last_time):,.0f} tok/s")
        if step >= self.total:
            parts.append(f"took {duration(now - began)}")
        elif warm_up:
            self._anchor = (now, step)
        elif step > anchor_step:
            parts.append(f"ETA {duration((self.total - step) * (now - anchor_time) / (step - anchor_step))}")
        return "".join(f" | {p}" for p in parts)
