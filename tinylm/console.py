"""Where a training run's messages go: lines for a person to read, and on a terminal a progress bar.

    Console()                      # print, no bar
    Console(bar=True)              # print, with tqdm's progress bar (`tinylm train`)
    Console(lines.append)          # collect the lines (tests, notebooks)
    QUIET                          # nothing: the processes other than rank 0 of a distributed run

With a bar on screen a line is printed above it (tqdm.write), so the bar is redrawn below, not torn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Console:
    """`say(line)` shows a line; `progress` makes the run's progress bar (one that draws nothing unless `bar`)."""

    write: Callable[[str], None] = print  # how one line is shown (with `bar`, lines go above the bar on stdout)
    bar: bool = False  # draw a progress bar on stdout while training

    def say(self, line: str) -> None:
        if self.bar:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)
        else:
            self.write(line)

    def progress(self, total: int, initial: int) -> Any:
        """A tqdm bar over `total` steps from `initial` (does nothing without `bar`): update, set_postfix, close."""
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0,
                    disable=not self.bar, file=sys.stdout)


def _nothing(line: str) -> None:
    """Shows no line."""


QUIET = Console(_nothing)
