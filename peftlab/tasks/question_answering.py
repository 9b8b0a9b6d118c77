"""Extractive question answering (SQuAD-style): the answer is a span of the context.

Question and context are encoded as a pair; a context longer than ``data.max_length`` is cut into
overlapping windows (``task_options.doc_stride`` tokens shared). Each window remembers its question
(the window-to-example map travels with the batch as ``_window``, so neither batching by length nor
several processes can pair a window with the wrong question). Training targets are the first
answer's start and end token, or the first token (``[CLS]``) in a window that does not hold it all.

Decoding (evaluation and ``peftlab predict`` alike), as the transformers question-answering example
does it: a span's score is start logit + end logit, over spans inside the context with start <= end
and at most ``task_options.max_answer_length`` tokens; the question's answer is the best span of all
its windows, cut from the context by the tokenizer's character offsets. Raw logits compare across
windows: a window trained to point at ``[CLS]`` (it lacks the answer) scores its context low, where
probabilities renormalised over the context alone would make its best guess look sure. The reported
``score`` is the span's probability, p(start) * p(end) with softmaxes over the whole window. Scored
with SQuAD v1.1's exact match and token F1 (``peftlab.metrics.squad_scores``).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from transformers import DataCollatorWithPadding

from ..data import check_text_rows, load_splits
from ..errors import PeftlabError
from ..metrics import squad_scores
from . import EncodedSplit, LossTally, NoOptions, Plan, Task, batch_to_model_inputs, register_task

NEG = -1e4  # pads the logits of shorter windows when processes gather them


class QAOptions(NoOptions):
    question_column: str = Field("question", description="Question column (JSONL/hub; SQuAD JSON has its own).")
    context_column: str = Field("context", description="Context column (JSONL/hub).")
    answers_column: str = Field(
        "answers", description="Answers column (JSONL/hub): a list of {text, answer_start}, or "
        "{text: [...], answer_start: [...]} as in the hub's squad; the first answer is the training target.")
    doc_stride: int = Field(128, gt=0, description="Tokens shared by consecutive windows of a long context.")
    max_answer_length: int = Field(30, gt=0, description="Longest answer considered, in tokens.")
    token_type_ids: bool = Field(
        True, description="Mark the context as the pair's second segment (token type 1, as BERT was "
        "pretrained). false: every token is type 0, for a backbone trained on single texts whose frozen "
        "type-1 embedding a LoRA cannot adapt; a merged checkpoint then gives type 1 type 0's embedding, "
        "so it answers the same whether or not a user passes token types.")


@register_task
class QuestionAnswering(Task):
    name = "question_answering"
    description = "extractive question answering (SQuAD JSON, JSONL, hub): SQuAD exact match and F1"
    auto_model = "AutoModelForQuestionAnswering"
    metrics = ("f1", "exact_match", "loss")
    default_metric = "f1"
    peft_task_type = "QUESTION_ANS"
    pipeline_tag = "question-answering"
    has_labels = False
    Options = QAOptions
    input_file = "questions.jsonl"

    @classmethod
    def usage_code(cls, name: str) -> list[str]:
        # transformers 5 has no question-answering pipeline: the model gives start and end logits
        return [
            "import torch",
            "from transformers import AutoModelForQuestionAnswering, AutoTokenizer", "",
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
            f'model = AutoModelForQuestionAnswering.from_pretrained("{name}")',
            'question, context = "Who wrote it?", "The book was written by Ada Lovelace in 1843."',
            'enc = tokenizer(question, context, return_offsets_mapping=True, return_tensors="pt")',
            "offsets = enc.pop(\"offset_mapping\")[0]",
            "with torch.no_grad():",
            "    out = model(**enc)",
            "in_context = torch.tensor([s == 1 for s in enc.sequence_ids(0)])",
            "ok = torch.ones(len(in_context), len(in_context), dtype=torch.bool).triu().tril(29)  # start <= end, <= 30 tokens",
            "ok &= in_context[:, None] & in_context[None, :]",
            "span = (out.start_logits[0][:, None] + out.end_logits[0][None, :]).masked_fill(~ok, -1e9)",
            "start, end = divmod(int(span.argmax()), span.shape[1])",
            "print(context[offsets[start][0]:offsets[end][1]])",
        ]

    @classmethod
    def predict_command(cls, name: str) -> str:
        return f'peftlab predict {name} --question "Who wrote it?" --context "The book was written by Ada Lovelace."'

    @classmethod
    def predict_input(cls) -> str:
        return '{"question": "Who wrote it?", "context": "The book was written by Ada Lovelace."}'

    @property
    def columns(self) -> list[str]:
        o = self.options
        return [o.question_column, o.context_column, o.answers_column]

    # -- data -------------------------------------------------------------------------------------
    def column_keys(self) -> dict[str, str]:
        o = self.options
        return {o.question_column: "task_options.question_column", o.context_column: "task_options.context_column",
                o.answers_column: "task_options.answers_column"}

    def load_splits(self):
        context = self.options.context_column
        splits = load_splits(self.data_cfg, self.columns, kind="qa", unit="articles",
                             group=lambda ex: ex.get("title") or ex[context], named_by=self.column_keys())
        check_text_rows(splits.rows(), self.columns[:2])
        for ex in splits.rows():
            ex[self.options.answers_column] = self.answers_of(ex)
        for ex in splits.train:
            if not ex[self.options.answers_column]:
                raise PeftlabError(f"{ex['_where']}: a training question needs an answer; found none")
        return splits

    def answers_of(self, ex: dict) -> list[dict]:
        """The row's answers as ``[{"text", "answer_start"}]``, each checked against the context."""
        value, context = ex[self.options.answers_column], ex[self.options.context_column]
        if isinstance(value, dict) and isinstance(value.get("text"), list) and isinstance(value.get("answer_start"), list):
            value = [{"text": t, "answer_start": s} for t, s in zip(value["text"], value["answer_start"])]
        if not isinstance(value, list):
            raise PeftlabError(f"{ex['_where']}: answers: expected a list of {{text, answer_start}}, got "
                               f"{type(value).__name__}")
        answers = []
        for a in value:
            text, start = (a.get("text"), a.get("answer_start")) if isinstance(a, dict) else (None, None)
            if not isinstance(text, str) or not text or isinstance(start, bool) or not isinstance(start, int):
                raise PeftlabError(f"{ex['_where']}: answers: expected {{text: non-empty string, answer_start: "
                                   f"integer}}, got {a!r}"[:300])
            if context[start:start + len(text)] != text:
                raise PeftlabError(f"{ex['_where']}: answer {text!r} is not at character {start} of the context "
                                   f"(found {context[start:start + len(text)]!r})")
            answers.append({"text": text, "answer_start": start})
        return answers

    def model_kwargs(self) -> dict[str, Any]:
        return {}  # the span head has two outputs (start, end) and no labels

    # -- encoding ---------------------------------------------------------------------------------
    def encode(self, examples: list[dict], tokenizer: Any, split: str) -> EncodedSplit:
        """One feature per window; ``extra["windows"][w]`` = (question index, context offsets per token)."""
        o, max_length = self.options, self.data_cfg.max_length
        questions = [str(ex[o.question_column]).strip() for ex in examples]
        self._check_lengths(questions, examples, tokenizer)
        enc = tokenizer(questions, [ex[o.context_column] for ex in examples], truncation="only_second",
                        max_length=max_length, stride=o.doc_stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True)
        cls_id = tokenizer.cls_token_id
        skip = {"offset_mapping", "overflow_to_sample_mapping"} | (set() if o.token_type_ids else {"token_type_ids"})
        features, windows, owners = [], {}, []
        for w, q in enumerate(enc["overflow_to_sample_mapping"]):
            offsets = [tuple(off) if s == 1 else None for off, s in zip(enc["offset_mapping"][w], enc.sequence_ids(w))]
            ids = enc["input_ids"][w]
            start, end = self._target(examples[q], offsets, ids.index(cls_id) if cls_id in ids else 0)
            feat = {k: enc[k][w] for k in enc.keys() if k not in skip}
            features.append({**feat, "start_positions": start, "end_positions": end, "_window": w})
            windows[w] = (q, offsets)
            owners.append(examples[q])
        return EncodedSplit(features, owners, {"windows": windows, "questions": tuple(examples), "split": split})

    def _check_lengths(self, questions: list[str], examples: list[dict], tokenizer: Any) -> None:
        """A window must hold the question, its special tokens and more context than the stride."""
        o, max_length = self.options, self.data_cfg.max_length
        room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - o.doc_stride
        if room <= 0:
            raise PeftlabError(f"task_options.doc_stride: {o.doc_stride} leaves no room in a window of data.max_length "
                               f"{max_length} tokens; choose a stride below about half of max_length")
        for ex, n in zip(examples, map(len, tokenizer(questions, add_special_tokens=False)["input_ids"])):
            if n >= room:
                raise PeftlabError(f"{ex['_where']}: the question has {n} tokens; with data.max_length {max_length} "
                                   f"and task_options.doc_stride {o.doc_stride} a question may have at most "
                                   f"{room - 1} (raise max_length or lower doc_stride)")

    def _target(self, ex: dict, offsets: list, cls_index: int) -> tuple[int, int]:
        """Start and end token of the first answer, or ``cls_index`` twice when this window lacks it."""
        answers = ex[self.options.answers_column]
        if not answers:
            return cls_index, cls_index
        first, last = answers[0]["answer_start"], answers[0]["answer_start"] + len(answers[0]["text"])
        inside = [i for i, off in enumerate(offsets) if off is not None]
        if offsets[inside[0]][0] > first or offsets[inside[-1]][1] < last:
            return cls_index, cls_index
        start = next(i for i in inside if offsets[i][1] > first)
        end = next(i for i in reversed(inside) if offsets[i][0] < last)
        return start, end

    def merged_model(self, model: Any) -> Any:
        if not self.options.token_type_ids:  # trained on type 0 only: make every type type 0
            with torch.no_grad():
                for module in model.modules():
                    table = getattr(module, "token_type_embeddings", None)
                    if isinstance(table, torch.nn.Embedding):
                        table.weight[1:] = table.weight[0]
        return model

    def collator(self, tokenizer: Any):
        return DataCollatorWithPadding(tokenizer)

    def count_items(self, batch: dict) -> int:
        return int(batch["start_positions"].shape[0])  # one loss term per window

    def output_logits(self, outputs: Any) -> dict[str, torch.Tensor]:
        return {"start_logits": outputs.start_logits, "end_logits": outputs.end_logits}

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def window_logits(self, model: Any, dataloader: Any, accelerator: Any) -> tuple[dict, float]:
        """``{window id: (start logits, end logits)}`` of every window, and the mean loss."""
        model.eval()
        logits: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        tally = LossTally()
        for batch in dataloader:
            inputs = batch_to_model_inputs(batch)
            targets = [inputs.pop(k, None) for k in ("start_positions", "end_positions")]
            out = model(**inputs)
            row_loss = (window_losses(out.start_logits, out.end_logits, *targets) if targets[0] is not None
                        else torch.zeros(len(out.start_logits), device=out.start_logits.device))
            start, end = (accelerator.pad_across_processes(t.float(), dim=1, pad_index=NEG)
                          for t in (out.start_logits, out.end_logits))
            start, end, ids, row_loss, rows = accelerator.gather_for_metrics(
                (start, end, batch["_window"], row_loss, torch.full_like(row_loss, float(targets[0] is not None))))
            tally.add(row_loss, rows)
            for s, e, w in zip(start.cpu(), end.cpu(), ids.tolist()):
                logits[w] = (s, e)
        return logits, tally.mean()

    def answers(self, encoded: EncodedSplit, logits: dict) -> list[dict]:
        """The best answer of each question (``{"answer", "start", "end", "score"}``), in question order."""
        context_col = self.options.context_column
        questions = encoded.extra["questions"]
        best: list[Optional[tuple]] = [None] * len(questions)
        for w in sorted(logits):
            q, offsets = encoded.extra["windows"][w]
            span = best_span(*logits[w], offsets, self.options.max_answer_length)
            if span is not None and (best[q] is None or span.logit > best[q].logit):
                best[q] = span
        out = []
        for ex, span in zip(questions, best):
            start, end = (span.start, span.end) if span is not None else (0, 0)
            out.append({"answer": ex[context_col][start:end], "start": start, "end": end,
                        "score": round(span.probability, 6) if span is not None else 0.0})
        return out

    def evaluate(self, model: Any, dataloader: Any, accelerator: Any, encoded: EncodedSplit) -> dict:
        logits, loss = self.window_logits(model, dataloader, accelerator)
        found = self.answers(encoded, logits)
        references = [[a["text"] for a in ex[self.options.answers_column]] or [""]
                      for ex in encoded.extra["questions"]]
        scores = squad_scores([a["answer"] for a in found], references)
        return {**scores, "loss": loss, "examples": len(found), "windows": len(logits)}

    # -- prediction -------------------------------------------------------------------------------
    def predict_plans(self, tokenizer: Any, items: list[dict], batch_size: int) -> Iterator[Plan]:
        """``peftlab predict``: each ``{"question", "context"}`` -> its answer, character span and score;
        one plan per ``batch_size`` questions (their windows in batches of ``batch_size``)."""
        o = self.options
        if not all(isinstance(item, dict) for item in items):
            raise PeftlabError(f"{self.name}: each input needs a question and a context (--question/--context, "
                               f"or JSONL objects with question and context)")
        rows = [{o.question_column: it.get("question"), o.context_column: it.get("context"),
                 o.answers_column: [], "_where": f"input {n + 1}"} for n, it in enumerate(items)]
        check_text_rows(rows, self.columns[:2])
        collate = self.collator(tokenizer)
        for first in range(0, len(rows), batch_size):
            yield self._plan(rows[first:first + batch_size], items[first:first + batch_size], first, tokenizer,
                             collate, batch_size)

    def _plan(self, rows: list[dict], items: list[dict], first: int, tokenizer: Any, collate: Any,
              batch_size: int) -> Plan:
        encoded = self.encode(rows, tokenizer, "predict")
        groups = [encoded.features[b:b + batch_size] for b in range(0, len(encoded), batch_size)]
        batches = [{k: v for k, v in collate([{k: v for k, v in f.items() if not k.startswith("_")} for f in feats]).items()
                    if k not in ("start_positions", "end_positions")} for feats in groups]
        logits: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def take(j: int, res: Any) -> None:
            for f, s, e in zip(groups[j], res.start_logits.float().cpu(), res.end_logits.float().cpu()):
                logits[f["_window"]] = (s, e)

        def finish() -> list[dict]:
            return [{**({"id": item["id"]} if "id" in item else {}), "question": item["question"], **found}
                    for item, found in zip(items, self.answers(encoded, logits))]

        return Plan(list(range(first, first + len(rows))), batches, take, finish)


@lru_cache(maxsize=8)
def _band(n: int, max_len: int) -> torch.Tensor:
    """``[i, j]`` is True where a span may start at i and end at j (i <= j < i + max_len)."""
    ones = torch.ones(n, n, dtype=torch.bool)
    return ones.triu() & ones.tril(max_len - 1)


class Span(NamedTuple):
    logit: float  # start logit + end logit: what windows are compared by
    probability: float  # p(start) * p(end), softmaxes over the whole window
    start: int  # characters of the context
    end: int



def window_losses(start: torch.Tensor, end: torch.Tensor, start_pos: torch.Tensor, end_pos: torch.Tensor) -> torch.Tensor:
    """Each window's term of transformers' question-answering loss: the mean of the start and end
    cross-entropies, positions past the window ignored (as the model's own loss clamps them)."""
    ignored = start.shape[1]
    losses = [F.cross_entropy(logits.float(), pos.clamp(0, ignored), ignore_index=ignored, reduction="none")
              for logits, pos in ((start, start_pos), (end, end_pos))]
    return (losses[0] + losses[1]) / 2

def best_span(start: torch.Tensor, end: torch.Tensor, offsets: list, max_len: int) -> Optional[Span]:
    """The window's best span inside the context by start + end logit; None when it holds no context."""
    n = len(offsets)
    in_context = torch.tensor([off is not None for off in offsets], dtype=torch.bool)
    if not bool(in_context.any()):
        return None
    start, end = start[:n].float(), end[:n].float()
    allowed = _band(n, max_len) & in_context[:, None] & in_context[None, :]
    scores = (start[:, None] + end[None, :]).masked_fill(~allowed, -math.inf)
    flat = int(scores.argmax())
    i, j = divmod(flat, n)
    probability = float(start.softmax(-1)[i] * end.softmax(-1)[j])
    return Span(float(scores.view(-1)[flat]), probability, offsets[i][0], offsets[j][1])
