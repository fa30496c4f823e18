"""A sweep's progress line on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    """``cells done/total``, elapsed time and ETA on one stderr line."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True) -> None:
        self.total, self.done, self.start_done = total, done, done
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self._show()

    @staticmethod
    def _fmt(s: float) -> str:
        s = int(round(s))
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else \
            f"{s // 60}:{s % 60:02d}"

    def _show(self) -> None:
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        ran = self.done - self.start_done
        eta = "?" if ran == 0 else self._fmt(el / ran * (self.total - self.done))
        pct = 100 * self.done / max(self.total, 1)
        width = 24
        fill = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\rsweep [{'#' * fill}{'.' * (width - fill)}] {self.done}/"
                         f"{self.total} cells {pct:3.0f}%  elapsed {self._fmt(el)}  "
                         f"ETA {eta} ")
        sys.stderr.flush()

    def update(self, n: int) -> None:
        self.done += n
        self._show()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
