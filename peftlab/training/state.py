"""The training loop's state: what a checkpoint saves and a resumed run continues from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    batches_done: int = 0  # batches of that epoch consumed on each process
    best: Optional[float] = None  # best validation metric so far
    best_step: Optional[int] = None
    best_epoch: Optional[int] = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    train_time: float = 0.0  # seconds in training steps (evaluation excluded)
    eval_time: float = 0.0
    samples: int = 0  # training samples and non-padding tokens seen, all processes
    tokens: int = 0
    processes: int = 1
    loss_log: list[list] = field(default_factory=list)  # [step, mean loss] per log interval

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainState":
        """A checkpoint's state.json (keys this version does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def improved(self, value: float, mode: str) -> bool:
        return self.best is None or (value > self.best if mode == "max" else value < self.best)
