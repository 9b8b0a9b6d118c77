"""Generation (causal-LM fine-tuning): prompt -> completion pairs, loss on the completion only.

Each example (a CSV/TSV/JSONL row or hub record) becomes a prompt and a completion through the
recipe's templates, Python ``str.format`` fields over the example's columns::

    data:
      prompt_template: "Query: {text}\\nIntent:"
      completion_template: " {category:words}"   # card_arrival -> "card arrival"

Field format specs (comma-separated): ``words`` (``_``/``-`` -> space), ``lower``, ``upper``,
``strip``. When the tokenizer has a chat template and ``data.use_chat_template`` is true, the prompt
is the user turn and the completion the assistant turn (its leading whitespace dropped). Prompt and
completion are tokenized separately and concatenated (exactly what the model sees when it
generates), the completion ends with the tokenizer's EOS token, labels are -100 on the prompt and
on padding. Over-long examples keep the completion (at most half of ``data.max_length``) and the
end of the prompt.

Training loss: the LM head runs only at the positions whose next token is a completion token
(``logits_to_keep`` = a boolean mask, through every wrapper: peft, DDP), so the logits over the
whole vocabulary are never built for the prompt. Evaluation: teacher-forced completion loss and
perplexity, then greedy generation (``data.max_new_tokens``, left-padded prompts) scored by exact
match and token-level F1 after normalisation (lower case, punctuation -> space, whitespace
collapsed).

``CausalLM.generate(model, tokenizer, inputs)`` is the entry point for prediction: strings (filled
into the prompt template's single field) or dicts of columns in, completions out.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import string
import unicodedata
from collections import Counter
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..data import load_splits
from ..errors import PeftlabError
from ..sharded import is_sharded
from . import EncodedSplit, Task, register_task

log = logging.getLogger("peftlab")

FORMAT_SPECS = ("words", "lower", "upper", "strip")


# ------------------------------------------------------------------------------------ templates


class _TemplateFormatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        text = "" if value is None else str(value)
        for spec in [s.strip() for s in format_spec.split(",") if s.strip()]:
            if spec == "words":
                text = re.sub(r"[_\-]+", " ", text).strip()
            elif spec == "lower":
                text = text.lower()
            elif spec == "upper":
                text = text.upper()
            elif spec == "strip":
                text = text.strip()
            else:
                raise ValueError(f"unknown format spec '{spec}' (known: {', '.join(FORMAT_SPECS)})")
        return text


_FORMATTER = _TemplateFormatter()


def template_fields(template: str, key: str) -> list[str]:
    """The column names a template reads (``{text}``, ``{category:words}``), in order."""
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise PeftlabError(f"data.{key}: invalid template {template!r} ({exc})") from None
    fields: list[str] = []
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        root = re.split(r"[.\[]", field, maxsplit=1)[0]
        if not root or root.isdigit():
            raise PeftlabError(
                f"data.{key}: template {template!r} has a positional field '{{{field}}}'; "
                f"name the column, e.g. {{text}}"
            )
        for s in [s.strip() for s in (spec or "").split(",") if s.strip()]:
            if s not in FORMAT_SPECS:
                raise PeftlabError(
                    f"data.{key}: unknown format '{s}' in {{{field}:{spec}}} (known: {', '.join(FORMAT_SPECS)})"
                )
        if root not in fields:
            fields.append(root)
    return fields


def render(template: str, example: dict, key: str) -> str:
    try:
        return _FORMATTER.vformat(template, (), example)
    except (KeyError, IndexError, AttributeError, ValueError) as exc:
        where = example.get("_where", "example")
        raise PeftlabError(f"{where}: data.{key}: cannot fill {template!r} from this example ({exc})") from None


# -------------------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """Lower case, punctuation (``_`` included) -> space, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") or ch in "`~^|<>=+$" else ch for ch in text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over the normalised whitespace tokens."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


# ---------------------------------------------------------------------------------- model plumbing


def _unwrap(model: Any) -> Any:
    """Strip DDP / torch.compile wrappers (not peft: its forward adds prefixes and adapters)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel) or (
            type(model).__name__ in ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")
            and hasattr(model, "module")
        ):
            model = model.module
        else:
            return model


def _base_model(model: Any) -> Any:
    """The transformers model under peft (and other) wrappers."""
    model = _unwrap(model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


_KEEP_SUPPORT: dict[type, bool] = {}


def _accepts_logits_to_keep(model: Any) -> bool:
    base = _base_model(model)
    cls = type(base)
    if cls not in _KEEP_SUPPORT:
        try:
            params = inspect.signature(base.forward).parameters
            _KEEP_SUPPORT[cls] = "logits_to_keep" in params
        except (TypeError, ValueError):  # pragma: no cover
            _KEEP_SUPPORT[cls] = False
    return _KEEP_SUPPORT[cls]


def _virtual_tokens(model: Any) -> int:
    """Virtual tokens a peft prompt-learning method prepends to the inputs (prompt/p-tuning;
    prefix tuning adds keys/values, not positions)."""
    inner = _unwrap(model)
    config = getattr(inner, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    if str(getattr(config, "peft_type", "")).upper().endswith(("PREFIX_TUNING", "CARTRIDGE")):
        return 0
    return int(getattr(config, "num_virtual_tokens", 0) or 0)


def completion_logits(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions whose next token is a completion token only.

    Returns ``(logits [N, V], targets [N], rows [N])``; ``rows`` is each position's example index.
    The forward goes through the outermost wrapper (DDP's gradient sync, peft's adapters/prefixes);
    ``logits_to_keep`` (a boolean mask) makes the model apply its LM head at those positions only.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][keep[:, :-1]]
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[keep]
    n_virtual = _virtual_tokens(model)
    full_keep = keep
    if n_virtual:
        full_keep = torch.cat([keep.new_zeros(keep.shape[0], n_virtual), keep], dim=1)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = full_keep
    logits = model(**kwargs).logits
    if logits.dim() == 3:  # the model computed every position (no logits_to_keep support)
        logits = logits[full_keep] if logits.shape[1] == full_keep.shape[1] else logits[:, -keep.shape[1]:][keep]
    return logits, targets, rows


# ------------------------------------------------------------------------------------- collator


class CausalLMCollator:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` for teacher forcing; with
    ``prompt_len`` in the features also left-padded ``_prompt_ids``/``_prompt_mask`` for generation."""

    def __init__(self, pad_token_id: int):
        self.pad = int(pad_token_id)

    def __call__(self, features: list[dict]) -> dict:
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        labels = torch.full((len(features), n), -100, dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[i, :k] = 1
            labels[i, :k] = torch.tensor(f["labels"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if all("prompt_len" in f for f in features):
            prompts = [f["input_ids"][: f["prompt_len"]] for f in features]
            batch["_prompt_ids"], batch["_prompt_mask"] = left_pad(prompts, self.pad)
        return batch


def left_pad(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), n), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), n), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, n - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, n - len(s):] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------- task


@register_task
class CausalLM(Task):
    name = "causal_lm"
    description = "generation: prompt -> completion from templates; completion-only loss; exact match / token F1"
    auto_model = "AutoModelForCausalLM"
    metrics = ("exact_match", "token_f1", "loss", "perplexity")
    default_metric = "exact_match"
    peft_task_type = "CAUSAL_LM"
    pipeline_tag = "text-generation"
    has_labels = False

    @classmethod
    def usage_code(cls, name: str) -> list[str]:
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'tok = AutoTokenizer.from_pretrained("{name}")',
                f'model = AutoModelForCausalLM.from_pretrained("{name}")']

    # -- templates --------------------------------------------------------------------------------
    @property
    def prompt_fields(self) -> list[str]:
        fields = template_fields(self.data_cfg.prompt_template, "prompt_template")
        if not fields:
            raise PeftlabError(
                f"data.prompt_template: {self.data_cfg.prompt_template!r} reads no column; "
                f"use fields such as {{text}}"
            )
        return fields

    @property
    def columns(self) -> list[str]:
        return list(self.column_keys())  # the prompt's fields, then the completion's others

    def prompt_text(self, example: Union[dict, str]) -> str:
        """The filled prompt template; a string fills the template's single field."""
        if isinstance(example, str):
            fields = self.prompt_fields
            if len(fields) != 1:
                raise PeftlabError(
                    f"data.prompt_template: {self.data_cfg.prompt_template!r} reads {len(fields)} columns "
                    f"({', '.join(fields)}); give each input as a JSON object with those keys"
                )
            example = {fields[0]: example}
        return render(self.data_cfg.prompt_template, example, "prompt_template")

    def completion_text(self, example: dict) -> str:
        return render(self.data_cfg.completion_template, example, "completion_template")

    def uses_chat_template(self, tokenizer: Any) -> bool:
        return bool(self.data_cfg.use_chat_template and getattr(tokenizer, "chat_template", None))

    def prompt_strings(self, prompts: list[str], tokenizer: Any) -> list[str]:
        if not self.uses_chat_template(tokenizer):
            return prompts
        return [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]

    def encode_prompts(self, prompts: list[str], tokenizer: Any) -> list[list[int]]:
        """Token ids of filled prompts, chat template applied when used."""
        strings = self.prompt_strings(prompts, tokenizer)
        # the chat template writes its own special tokens; a plain prompt gets the tokenizer's (BOS)
        add_special = not self.uses_chat_template(tokenizer)
        return [list(x) for x in tokenizer(strings, add_special_tokens=add_special)["input_ids"]]

    # -- data -------------------------------------------------------------------------------------
    def column_keys(self) -> dict[str, str]:
        keys = {c: "data.prompt_template" for c in self.prompt_fields}
        for c in template_fields(self.data_cfg.completion_template, "completion_template"):
            keys.setdefault(c, "data.completion_template")
        return keys

    def load_splits(self):
        splits = load_splits(self.data_cfg, self.columns, kind="text", named_by=self.column_keys())
        self.set_labels([])
        return splits

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def encode(self, examples: list[dict], tokenizer: Any, split: str) -> EncodedSplit:
        self._tokenizer = tokenizer  # evaluate() decodes with it (the trainer passes no tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise PeftlabError("backbone.name: the tokenizer has no EOS token; causal_lm needs one to end completions")
        chat = self.uses_chat_template(tokenizer)
        prompts = [self.prompt_text(ex) for ex in examples]
        completions = [self.completion_text(ex) for ex in examples]
        if chat:
            completions = [c.lstrip() for c in completions]
        for ex, c in zip(examples, completions):
            if not c.strip():
                raise PeftlabError(
                    f"{ex.get('_where', 'example')}: data.completion_template: "
                    f"{self.data_cfg.completion_template!r} gives an empty completion"
                )
        prompt_ids = self.encode_prompts(prompts, tokenizer)
        completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
        max_len = self.data_cfg.max_length
        features, truncated = [], 0
        for p, c in zip(prompt_ids, completion_ids):
            c = list(c) + [eos]
            if len(p) + len(c) > max_len:
                truncated += 1
                c = c[: max(1, max_len // 2)] if len(c) > max_len // 2 and len(p) else c[:max_len]
                p = p[len(p) - (max_len - len(c)):] if max_len > len(c) else []
            feat = {"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)), "labels": [-100] * len(p) + c}
            if split != "train":
                feat["prompt_len"] = len(p)
            features.append(feat)
        if truncated:
            log.info("data: %d %s example(s) longer than data.max_length=%d were truncated (prompt start, "
                     "completion end)", truncated, split, max_len)
        references = [c.strip() for c in completions]
        return EncodedSplit(features, examples, {"references": references, "prompts": prompts})

    def collator(self, tokenizer: Any):
        self._tokenizer = tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return CausalLMCollator(pad)

    # -- training ---------------------------------------------------------------------------------
    def training_loss(self, model: Any, batch: dict) -> torch.Tensor:
        logits, targets, _rows = completion_logits(model, batch)
        return F.cross_entropy(logits.float(), targets)

    def count_items(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())  # the completion tokens predicted

    def loss_sum(self, model: Any, batch: dict) -> torch.Tensor:
        logits, targets, _rows = completion_logits(model, batch)
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    # -- generation -------------------------------------------------------------------------------
    def generation_config(self, model: Any, tokenizer: Any, max_new_tokens: Optional[int] = None) -> Any:
        from transformers import GenerationConfig

        eos = [tokenizer.eos_token_id]
        model_eos = getattr(getattr(_base_model(model), "generation_config", None), "eos_token_id", None)
        for e in model_eos if isinstance(model_eos, (list, tuple)) else [model_eos]:
            if e is not None and e not in eos:
                eos.append(int(e))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return GenerationConfig(
            max_new_tokens=max_new_tokens or self.data_cfg.max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=eos, pad_token_id=pad,
        )

    @torch.no_grad()
    def generate_ids(self, model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen_config: Any) -> torch.Tensor:
        """New token ids after each left-padded prompt (greedy); finished rows are padded."""
        model = _unwrap(model)
        # FSDP: every forward gathers weights from every process, so all keep stepping until the last finishes
        synced = any(is_sharded(p) for p in model.parameters())
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_config,
                             synced_gpus=synced)
        return out[:, prompt_ids.shape[1]:]

    def decode(self, ids: torch.Tensor, tokenizer: Any, gen_config: Any) -> list[str]:
        stops = set(gen_config.eos_token_id if isinstance(gen_config.eos_token_id, list) else [gen_config.eos_token_id])
        texts = []
        for row in ids.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return texts

    @torch.no_grad()
    def generate(self, model: Any, tokenizer: Any, inputs: Sequence[Union[str, dict]],
                 max_new_tokens: Optional[int] = None, batch_size: int = 16, templated: bool = True) -> list[str]:
        """Greedy completions for ``inputs`` (prediction / serving entry point).

        ``inputs``: strings (filled into the prompt template's single field) or dicts of columns;
        ``templated=False`` takes strings as finished prompts (the chat template still applies).
        The model may be a peft model, a merged transformers model, or a DDP-wrapped one.
        """
        model.eval()
        prompts = [self.prompt_text(x) if templated else str(x) for x in inputs]
        ids = self.encode_prompts(prompts, tokenizer)
        gen_config = self.generation_config(model, tokenizer, max_new_tokens)
        device = next((p.device for p in _unwrap(model).parameters()), torch.device("cpu"))
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together
        out: list[Optional[str]] = [None] * len(ids)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            p_ids, p_mask = left_pad([ids[i] for i in chunk], gen_config.pad_token_id)
            new = self.generate_ids(model, p_ids.to(device), p_mask.to(device), gen_config)
            for i, text in zip(chunk, self.decode(new.cpu(), tokenizer, gen_config)):
                out[i] = text
        return [o or "" for o in out]

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: Any, dataloader: Any, accelerator: Any, encoded: EncodedSplit,
                 tokenizer: Any = None) -> dict:
        model.eval()
        tokenizer = tokenizer or getattr(self, "_tokenizer", None)
        if tokenizer is None:
            raise RuntimeError("causal_lm.evaluate needs the tokenizer (encode() remembers it)")
        gen_config = self.generation_config(model, tokenizer)
        pad = gen_config.pad_token_id
        generated: list[list[int]] = []
        loss_sums, token_counts = [], []
        for batch in dataloader:
            logits, targets, rows = completion_logits(model, batch)
            token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
            b = batch["input_ids"].shape[0]
            per_sum = torch.zeros(b, device=token_loss.device, dtype=torch.float64).index_add_(0, rows, token_loss.double())
            per_n = torch.bincount(rows, minlength=b).to(torch.float64)
            new = self.generate_ids(model, batch["_prompt_ids"], batch["_prompt_mask"], gen_config)
            if new.shape[1] == 0:
                new = torch.full((b, 1), pad, dtype=torch.long, device=new.device)
            new = accelerator.pad_across_processes(new.contiguous(), dim=1, pad_index=pad)
            new, per_sum, per_n = accelerator.gather_for_metrics((new, per_sum, per_n))
            generated.extend(new.cpu().tolist())
            loss_sums.append(per_sum.cpu())
            token_counts.append(per_n.cpu())
        predictions = self.decode(torch.tensor(_pad_rows(generated, pad)), tokenizer, gen_config) if generated else []
        references = encoded.extra["references"]
        if len(predictions) != len(references):  # pragma: no cover - a sharding bug, never silently
            raise RuntimeError(f"causal_lm.evaluate: {len(predictions)} predictions for {len(references)} examples")
        total_loss = float(torch.cat(loss_sums).sum()) if loss_sums else 0.0
        total_tokens = float(torch.cat(token_counts).sum()) if token_counts else 0.0
        loss = total_loss / total_tokens if total_tokens else math.nan
        n = len(references)
        return {
            "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n if n else 0.0,
            "token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n if n else 0.0,
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)) if loss == loss else math.nan,
            "examples": n,
            "completion_tokens": int(total_tokens),
            "samples": [
                {"prompt": encoded.extra["prompts"][i], "prediction": predictions[i], "reference": references[i]}
                for i in range(min(n, 8))
            ],
        }


def _pad_rows(rows: list[list[int]], pad: int) -> list[list[int]]:
    n = max(len(r) for r in rows)
    return [r + [pad] * (n - len(r)) for r in rows]
