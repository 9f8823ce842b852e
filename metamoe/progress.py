"""Progress of long work: a live bar on a terminal, one log line per step otherwise.

M0 pre-training and every other training run (per epoch), the embedding of large input sets
such as the public pool (per batch, at most ~10 lines), and ``metamoe.compare`` (per run,
"run i of N", with an ETA from the runs already finished) report through :class:`Progress`.
On a terminal (stderr is a TTY and ``METAMOE_PROGRESS`` is not ``log``) it draws a tqdm bar;
elsewhere — Ray actors, the simulation's ServerApp, CI, a log file — it writes log lines,
which Ray forwards from the actors to the driver's output.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("metamoe")


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def on_terminal() -> bool:
    return os.environ.get("METAMOE_PROGRESS", "") != "log" and sys.stderr.isatty()


class Progress:
    """``total`` steps of ``desc``; :meth:`step` after each one (``info`` goes on the line)."""

    def __init__(self, total: int, desc: str, unit: str = "step", lines: int | None = None):
        self.total, self.desc, self.unit = max(int(total), 1), desc, unit
        self.done = 0
        self.t0 = time.perf_counter()
        # Log-line mode: every step, or about ``lines`` lines for long loops.
        self.every = 1 if lines is None else max(1, self.total // max(lines, 1))
        self.bar = None
        if on_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False,
                            file=sys.stderr, dynamic_ncols=True)

    def step(self, n: int = 1, info: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if info:
                self.bar.set_postfix_str(info, refresh=False)
            return
        if self.done % self.every and self.done < self.total:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        log.info("%s %s %d/%d%s (%s elapsed, ETA %s)", self.desc, self.unit, self.done,
                 self.total, f" {info}" if info else "", _fmt(elapsed), _fmt(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
