"""What a plan is: its components, the peak, the settings, and how it prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..errors import PeftlabError

MIB = 2**20


@dataclass
class Component:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    recipe: str
    device: str
    batch_size: int
    grad_accum: int
    eval_batch_size: int
    gradient_checkpointing: bool
    components: list[Component]
    peak_bytes: int
    peak_phase: str  # train (forward + backward), step (optimizer) or eval
    load_bytes: int  # resident after the model is loaded, before training
    samples_per_s: float
    tokens_per_s: float
    budget_bytes: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.budget_bytes is None else self.peak_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fits"] = self.fits
        return d

    def table(self) -> str:
        """The plan as aligned text: each component, the peak, the budget."""
        rows = [(c.name, f"{c.bytes / MIB:,.0f} MiB", c.note) for c in self.components]
        rows.append(("peak (" + self.peak_phase + ")", f"{self.peak_bytes / MIB:,.0f} MiB", ""))
        if self.budget_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            rows.append(("budget", f"{self.budget_bytes / MIB:,.0f} MiB", verdict))
        width = max(len(r[0]) for r in rows)
        size = max(len(r[1]) for r in rows)
        lines = [f"plan: {self.recipe} on {self.device}: batch {self.batch_size} x {self.grad_accum} accum, "
                 f"eval batch {self.eval_batch_size}, gradient checkpointing "
                 f"{'on' if self.gradient_checkpointing else 'off'}"]
        lines += [f"  {n:<{width}}  {b:>{size}}  {note}".rstrip() for n, b, note in rows]
        lines.append(f"  speed: {self.samples_per_s:,.1f} samples/s, {self.tokens_per_s:,.0f} tokens/s (training steps)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def parse_memory(text: Any, key: str = "--memory") -> int:
    from ..system import memory_bytes

    value = memory_bytes(text)
    if value is None:
        raise PeftlabError(f"{key}: '{text}' is not a memory size (expected e.g. 24GiB, 1500MiB or bytes)")
    return value
