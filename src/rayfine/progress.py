"""Progress on long CLI work: a tqdm bar on a terminal, plain lines when the output is not one
(CI logs, pipes, files), so logs stay readable and terminals stay tidy.

    with Progress(total=10, desc="epochs", log=print) as progress:
        progress.line("[train] epoch 1/10 ...")   # printed above the bar, or as a plain line
        progress.advance(postfix="val_acc 0.91")
"""

from __future__ import annotations

import builtins
import os
import sys
from typing import Callable, Optional

# print as it was before Ray's driver-side tqdm support (ray.experimental.tqdm_ray) swaps
# builtins.print for a bar-aware one: either means "the console".
_PRINT = builtins.print


def to_console(log: Callable[[str], None]) -> bool:
    """Whether ``log`` writes to this process's console (print), not to a collector."""
    return log is _PRINT or log is builtins.print


def interactive(log: Callable[[str], None]) -> bool:
    """A person at a terminal reads what ``log`` writes: bars and live tables are welcome. Not on
    a terminal without cursor movement (TERM=dumb: Emacs' shell, some CI ptys)."""
    return to_console(log) and sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"


class Progress:
    def __init__(self, total: int, desc: str, log: Callable[[str], None] = print, initial: int = 0):
        # A bar only for a person at a terminal; callers that collect lines (tests, jobs) get lines.
        self.bar = None
        self.log = log
        if interactive(log):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stdout, dynamic_ncols=True, leave=False)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.log(text)

    def advance(self, n: int = 1, postfix: Optional[str] = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
