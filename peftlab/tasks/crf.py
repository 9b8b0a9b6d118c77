"""A linear-chain CRF head for token classification (``task_options.head: crf``).

:class:`CRFClassifier` *is* the model's ``classifier`` linear layer (same weight and bias names, so a
plain transformers checkpoint of it still loads: the emissions) plus learned transition scores
between tags (``transitions``, ``start_transitions``, ``end_transitions``). Every method treats it as
the task head (trained, saved with the method's weights, copied by peft's ``modules_to_save``). The
sequence it scores is a sentence's first-sub-token positions; training minimises the negative
log-likelihood of the gold tags (forward algorithm), prediction is the Viterbi path. With
``allowed`` given, transitions outside it (IOB2: ``I-X`` after anything but ``B-X``/``I-X``, or
first) are never decoded and carry no probability.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import torch

FORBIDDEN = -1e4  # a forbidden transition's score: exp() of it is 0 in float32


def iob2_allowed(labels: list[str]) -> torch.Tensor:
    """``[i, j]``: tag j may follow tag i; the last row is the start (``I-X`` may only follow B-X/I-X)."""
    n = len(labels)
    allowed = torch.ones(n + 1, n, dtype=torch.bool)
    for j, tag in enumerate(labels):
        if tag.startswith("I-"):
            kind = tag[2:]
            allowed[:, j] = False
            for i, prev in enumerate(labels):
                allowed[i, j] = prev in (f"B-{kind}", f"I-{kind}")
    return allowed


def repair_iob2(tags: list[str]) -> list[str]:
    """``I-X`` where IOB2 forbids it becomes ``B-X``: the entities seqeval reads stay the same."""
    out = []
    for i, tag in enumerate(tags):
        if tag.startswith("I-") and (i == 0 or out[-1] not in (f"B-{tag[2:]}", tag)):
            tag = "B-" + tag[2:]
        out.append(tag)
    return out


_USED = threading.local()


class CRFClassifier(torch.nn.Linear):
    """The emission layer (a ``Linear``) with CRF transitions. :meth:`used` is the instance whose
    forward ran last in this thread, i.e. the copy a wrapped model (peft's ``modules_to_save``) used."""

    def __init__(self, in_features: int, num_tags: int, allowed: Optional[torch.Tensor] = None):
        super().__init__(in_features, num_tags)
        self.transitions = torch.nn.Parameter(torch.zeros(num_tags, num_tags))
        self.start_transitions = torch.nn.Parameter(torch.zeros(num_tags))
        self.end_transitions = torch.nn.Parameter(torch.zeros(num_tags))
        mask = allowed if allowed is not None else torch.ones(num_tags + 1, num_tags, dtype=torch.bool)
        self.register_buffer("allowed", mask.clone(), persistent=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, allowed: Optional[torch.Tensor] = None) -> "CRFClassifier":
        head = cls(linear.in_features, linear.out_features, allowed).to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            head.weight.copy_(linear.weight)
            head.bias.copy_(linear.bias)
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _USED.crf = self
        return super().forward(x)

    @staticmethod
    def used() -> "CRFClassifier":
        """The CRF head of this thread's last forward pass (each model in a server has its own)."""
        return _USED.crf

    def _scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(start, transitions, end) with forbidden entries set to FORBIDDEN."""
        start = self.start_transitions.float().masked_fill(~self.allowed[-1], FORBIDDEN)
        trans = self.transitions.float().masked_fill(~self.allowed[:-1], FORBIDDEN)
        return start, trans, self.end_transitions.float()

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``tags`` per sequence. ``emissions`` (B, T, C); ``tags`` (B, T);
        ``mask`` (B, T) True on each sequence's first ``length`` positions (length >= 1)."""
        start, trans, end = self._scores()
        emissions = emissions.float()
        gold = start[tags[:, 0]] + emissions[:, 0].gather(1, tags[:, :1]).squeeze(1)
        alpha = start + emissions[:, 0]
        for t in range(1, emissions.shape[1]):
            step = trans[tags[:, t - 1], tags[:, t]] + emissions[:, t].gather(1, tags[:, t:t + 1]).squeeze(1)
            gold = gold + step * mask[:, t]
            nxt = torch.logsumexp(alpha[:, :, None] + trans[None] + emissions[:, t, None, :], dim=1)
            alpha = torch.where(mask[:, t, None], nxt, alpha)
        last = tags.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1)
        return torch.logsumexp(alpha + end, dim=1) - (gold + end[last])

    @torch.no_grad()
    def viterbi(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """The best tag sequence of each sequence (its ``mask``'d length)."""
        start, trans, end = self._scores()
        score = start + emissions[:, 0].float()
        history = []
        for t in range(1, emissions.shape[1]):
            best, idx = (score[:, :, None] + trans[None]).max(dim=1)
            score = torch.where(mask[:, t, None], best + emissions[:, t].float(), score)
            history.append(idx)
        score = score + end
        paths = []
        for b, length in enumerate(mask.sum(1).tolist()):
            tag = int(score[b].argmax())
            path = [tag]
            for t in range(length - 1, 0, -1):
                tag = int(history[t - 1][b, tag])
                path.append(tag)
            paths.append(path[::-1])
        return paths


CRF_TENSORS = ("transitions", "start_transitions", "end_transitions")


def load_crf_tensors(head: CRFClassifier, folder: Path) -> None:
    """The head's transition tensors from the checkpoint in ``folder`` (any ``*classifier.<name>`` key
    of its safetensors files), if it has them: a backbone has none, a saved CRF model has them."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                name = key.rsplit(".", 1)[-1]
                if name in CRF_TENSORS and key.removesuffix("." + name).endswith("classifier"):
                    with torch.no_grad():
                        getattr(head, name).copy_(fh.get_tensor(key))


def compact(values: torch.Tensor, labels: torch.Tensor, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled positions (``labels != -100``) of each row moved to the front: (B, T, ...) values
    and the (B, T) mask of the kept positions, T = the most any row keeps (at least 1)."""
    keep = labels != -100
    lengths = keep.sum(1)
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept positions first, in order
    index = order.view(*order.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    out = values.gather(1, index)
    mask = torch.arange(width, device=labels.device)[None, :] < lengths[:, None]
    if values.dim() == 2:
        out = out.masked_fill(~mask, fill)
    return out, mask
