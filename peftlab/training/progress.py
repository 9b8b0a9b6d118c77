"""What a run shows while it trains: the training loss over each log interval, and a progress bar
on a terminal (where stderr is a file, the loss lines are the progress)."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Optional

import torch


class LossMeter:
    """The summed loss and item count (target tokens, examples) since the last log line, per rank;
    the logged value is the mean over every item of every rank."""

    def __init__(self, accelerator: Any, pending: Optional[list] = None):
        self.accelerator = accelerator
        self.total = torch.zeros((), device=accelerator.device)
        self.items = 0
        if pending:  # resumed: this rank's [sum, count] of the interrupted interval
            if isinstance(pending[0], list):
                pending = pending[accelerator.process_index]
            self.total += pending[0]
            self.items = int(pending[1])

    def add(self, loss_sum: torch.Tensor, items: int) -> None:
        self.total += loss_sum.detach().float()
        self.items += items

    def mean(self) -> float:
        """The interval's mean over every rank (a collective: every rank calls it), then a new interval."""
        acc = self.accelerator
        both = torch.stack([self.total, torch.tensor(float(self.items), device=acc.device)])
        both = acc.reduce(both, "sum") if acc.num_processes > 1 else both
        self.total.zero_()
        self.items = 0
        return float(both[0] / both[1].clamp(min=1))

    def pending(self) -> list:
        """Every rank's [sum, count] of the open interval, for a checkpoint (a collective)."""
        mine = torch.tensor([[float(self.total), float(self.items)]], device=self.accelerator.device)
        return self.accelerator.gather(mine).cpu().tolist()


class ProgressBar:
    """tqdm over the optimizer steps, on rank 0 and only when stderr is a terminal."""

    def __init__(self) -> None:
        self.bar: Any = None

    @property
    def shown(self) -> bool:
        return self.bar is not None

    def open(self, main: bool, total: int, initial: int) -> None:
        if main and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr,
                            mininterval=2.0)

    def update(self, **postfix: str) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(**postfix)
            else:
                self.bar.update(1)

    @contextlib.contextmanager
    def evaluating(self, dataloader: Any, desc: str) -> Iterator[Any]:
        """``dataloader`` with a bar of its own on the training bar's line while it runs (terminal
        only); afterwards the training bar's rate and ETA leave the evaluation's time out."""
        if self.bar is None:
            yield dataloader
            return
        from tqdm.auto import tqdm

        self.bar.clear()
        inner = tqdm(dataloader, desc=desc, total=len(dataloader), leave=False, position=0, dynamic_ncols=True,
                     file=sys.stderr, mininterval=1.0)
        try:
            yield inner
        finally:
            inner.close()
            self.bar.unpause()
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
