"""Baseline: the same recipe trained by a plain transformers ``Trainer`` script (+ peft for LoRA).

    python benchmarks/baselines/trainer_baseline.py RECIPE [key=value ...] output.dir=DIR [--resume]

This is written the way the transformers token/sequence-classification guides teach it:
``AutoModelFor*``, ``tokenize_and_align_labels`` (first sub-token of each word labelled),
``DataCollatorForTokenClassification`` / ``DataCollatorWithPadding``, ``TrainingArguments`` with
per-epoch evaluation and ``load_best_model_at_end``, seqeval for entity F1, ``report_to="none"``
and no hub. It takes from peftlab only what makes the comparison fair: the recipe (read with
``peftlab.recipe.load_recipe``, so defaults match), the data rows (``peftlab.data.load_splits``: the
same files, held-out split and training subset) and the backbone folder (``resolve_backbone``).
Methods: ``full`` (no peft) and ``lora`` (peft ``LoraConfig`` with the recipe's options).

It writes what ``peftlab train`` writes, in the same JSON shape, so ``peftlab bench`` can run it as
a cell: ``metrics.json`` (dev at the best epoch, test with the best model, history), ``params.json``,
``resources.json`` (peak RSS, train time without evaluation, samples/s, non-padding tokens/s),
``recipe.yaml`` and ``model/`` (``trainer.save_model``). NER is scored against every gold word: a
word that gets no sub-token (an emoji, a truncated tail) counts as predicted ``O``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from datasets import Dataset
from torch.utils.data import SequentialSampler
from peft import LoraConfig, TaskType, get_peft_model
from seqeval.metrics import f1_score, precision_score, recall_score
from sklearn.metrics import f1_score as sk_f1_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from peftlab.atomicio import write_json, write_text
from peftlab.backbones import resolve_backbone
from peftlab.data import load_splits
from peftlab.errors import PeftlabError
from peftlab.tasks.token_classification import sort_tags  # the same label order as peftlab
from peftlab.recipe import load_recipe

IMPLEMENTATION = "transformers.Trainer (benchmarks/baselines/trainer_baseline.py)"


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM, as peftlab measures (ru_maxrss would include the launching process's size)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


class CountingCollator:
    """The docs' collator, counting the samples and non-padding tokens of training batches."""

    def __init__(self, inner):
        self.inner = inner
        self.training = False
        self.samples = 0
        self.tokens = 0

    def __call__(self, features):
        batch = self.inner(features)
        if self.training:
            self.samples += int(batch["input_ids"].shape[0])
            self.tokens += int(batch["attention_mask"].sum())
        return batch


class TrainTime(TrainerCallback):
    """Training time without evaluation/checkpointing (Trainer evaluates after on_epoch_end)."""

    def __init__(self, counter: CountingCollator):
        self.counter = counter
        self.seconds = 0.0
        self.t0 = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()
        self.counter.training = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.t0 is not None:
            self.seconds += time.perf_counter() - self.t0
        self.t0 = None
        self.counter.training = False



class SequentialEvalTrainer(Trainer):
    """transformers' ``Trainer``, evaluating in dataset order.

    With ``train_sampling_strategy="group_by_length"`` transformers 5.x also length-groups the
    *evaluation* sampler, so ``evaluate``/``predict`` return rows in a shuffled order. The guides'
    ``compute_metrics`` pairs predictions with ``eval_pred.label_ids`` (shuffled the same way), but
    scoring against every gold word needs each row's ``word_ids``, i.e. dataset order. Grouping by
    length stays on for training (as in the peftlab recipe it is compared with).
    """

    def _get_eval_sampler(self, eval_dataset):
        if eval_dataset is None:
            return None
        # transformers' own branch when not grouping by length (None: accelerate shards it in order)
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None


def main(argv: list[str]) -> int:
    resume = "--resume" in argv
    args = [a for a in argv if a != "--resume"]
    if not args:
        print("usage: trainer_baseline.py RECIPE [key=value ...] output.dir=DIR [--resume]", file=sys.stderr)
        return 2
    wall0 = time.perf_counter()
    recipe = load_recipe(args[0], args[1:])
    cfg, data_cfg = recipe.train, recipe.data
    method = recipe.method.name
    if method not in ("full", "lora"):
        raise PeftlabError(f"{recipe.source}: method.name: the Trainer baseline implements full and lora (got '{method}')")
    if recipe.backbone.quantization != "none":
        raise PeftlabError(f"{recipe.source}: backbone.quantization: the Trainer baseline trains unquantized backbones")
    notes = []
    if cfg.head_lr:
        notes.append("train.head_lr is not supported by Trainer's optimizer; train.lr used for every parameter")
    out = Path(recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)

    # ---- data: the same rows peftlab reads
    ner = recipe.task == "token_classification"
    if ner:
        columns, kind = [data_cfg.tokens_column, data_cfg.tags_column], "tokens"
    elif recipe.task == "sequence_classification":
        columns, kind = [data_cfg.text_column, data_cfg.label_column], "text"
    else:
        raise PeftlabError(f"{recipe.source}: task: the Trainer baseline implements token and sequence classification")
    splits = load_splits(data_cfg, columns, kind)
    if ner:
        label_list = sort_tags({t for ex in splits.train for t in ex[columns[1]]})
    else:
        label_list = sorted({str(ex[columns[1]]) for ex in splits.train})
    label2id = {label: i for i, label in enumerate(label_list)}
    id2label = dict(enumerate(label_list))

    def to_dataset(rows):
        if ner:
            return Dataset.from_dict({"tokens": [r[columns[0]] for r in rows],
                                      "ner_tags": [[label2id[t] for t in r[columns[1]]] for r in rows]})
        return Dataset.from_dict({"text": [str(r[columns[0]]) for r in rows],
                                  "label": [label2id[str(r[columns[1]])] for r in rows]})

    raw = {"train": to_dataset(splits.train), "validation": to_dataset(splits.validation)}
    if splits.test is not None:
        raw["test"] = to_dataset(splits.test)

    # ---- tokenizer and preprocessing, as in the guides
    path = resolve_backbone(recipe.backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def tokenize_and_align_labels(examples):
        tokenized = tokenizer(examples["tokens"], truncation=True, max_length=data_cfg.max_length,
                              is_split_into_words=True)
        labels, all_word_ids = [], []
        for i, label in enumerate(examples["ner_tags"]):
            word_ids = tokenized.word_ids(batch_index=i)
            previous = None
            label_ids = []
            for word_idx in word_ids:
                if word_idx is None:
                    label_ids.append(-100)
                elif word_idx != previous:
                    label_ids.append(label[word_idx])
                else:
                    label_ids.append(-100)
                previous = word_idx
            labels.append(label_ids)
            all_word_ids.append([-1 if w is None else w for w in word_ids])
        tokenized["labels"] = labels
        tokenized["word_ids"] = all_word_ids
        return tokenized

    def preprocess_text(examples):
        return tokenizer(examples["text"], truncation=True, max_length=data_cfg.max_length)

    if ner:
        tokenized = {k: ds.map(tokenize_and_align_labels, batched=True) for k, ds in raw.items()}
        collator = CountingCollator(DataCollatorForTokenClassification(tokenizer=tokenizer))
        auto = AutoModelForTokenClassification
    else:
        tokenized = {k: ds.map(preprocess_text, batched=True) for k, ds in raw.items()}
        collator = CountingCollator(DataCollatorWithPadding(tokenizer=tokenizer))
        auto = AutoModelForSequenceClassification

    # ---- model (+ peft)
    model = auto.from_pretrained(path, num_labels=len(label_list), id2label=id2label, label2id=label2id,
                                 use_safetensors=True)
    backbone_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))
    head_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier"))
    if method == "lora":
        o = recipe.method_options
        peft_config = LoraConfig(
            task_type=TaskType.TOKEN_CLS if ner else TaskType.SEQ_CLS,
            r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=o.target_modules,
            bias=o.bias, use_dora=o.use_dora, use_rslora=o.use_rslora,
            modules_to_save=["classifier", *o.modules_to_save],
        )
        model = get_peft_model(model, peft_config)
    load_rss, load_peak = rss_bytes(), peak_rss_bytes()
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    t_all = sum(trainable.values())
    t_head = sum(v for n, v in trainable.items() if "classifier" in n)

    # ---- metrics
    def ner_scores(logits, ds) -> dict:
        preds = np.argmax(logits, axis=-1)
        y_true, y_pred = [], []
        for i, (tags, word_ids) in enumerate(zip(ds["ner_tags"], ds["word_ids"])):
            words = ["O"] * len(tags)
            previous = None
            for j, w in enumerate(word_ids):
                if w != -1 and w != previous:
                    words[w] = id2label[int(preds[i, j])]
                previous = w
            y_true.append([id2label[t] for t in tags])
            y_pred.append(words)
        n_words = sum(len(t) for t in y_true)
        correct = sum(a == b for t, p in zip(y_true, y_pred) for a, b in zip(t, p))
        return {
            "f1": float(f1_score(y_true, y_pred, zero_division=0)),
            "precision": float(precision_score(y_true, y_pred, zero_division=0)),
            "recall": float(recall_score(y_true, y_pred, zero_division=0)),
            "accuracy": correct / n_words if n_words else 0.0,
        }

    def cls_scores(logits, ds) -> dict:
        preds = np.argmax(logits, axis=-1)
        gold = np.asarray(ds["label"])
        return {"accuracy": float((preds == gold).mean()),
                "macro_f1": float(sk_f1_score(gold, preds, average="macro", zero_division=0))}

    scores = ner_scores if ner else cls_scores
    metric = cfg.metric or ("f1" if ner else "accuracy")

    def compute_metrics(eval_pred):
        return scores(eval_pred.predictions, tokenized["validation"])

    # ---- training arguments from the recipe
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio
    args_tr = TrainingArguments(
        output_dir=str(out / "trainer"),
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        weight_decay=cfg.weight_decay,
        warmup_steps=warmup,
        lr_scheduler_type={"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.scheduler],
        max_grad_norm=cfg.max_grad_norm or 0.0,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=metric != "loss",
        save_total_limit=cfg.keep_checkpoints,
        logging_steps=cfg.log_every,
        seed=cfg.seed,
        bf16=cfg.mixed_precision == "bf16",
        fp16=cfg.mixed_precision == "fp16",
        gradient_checkpointing=cfg.gradient_checkpointing,
        report_to="none",
        push_to_hub=False,
    )
    timer = TrainTime(collator)
    trainer = SequentialEvalTrainer(
        model=model,
        args=args_tr,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
        callbacks=[timer],
    )
    has_ckpt = any((out / "trainer").glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if (resume and has_ckpt) else None)

    # ---- best model (restored by load_best_model_at_end), dev entry, test
    history = []
    eval_time = 0.0
    for entry in trainer.state.log_history:
        if f"eval_{metric}" in entry:
            history.append({"epoch": max(1, math.ceil(entry["epoch"] - 1e-9)), "step": entry["step"],
                            **{k[5:]: v for k, v in entry.items()
                               if k.startswith("eval_") and isinstance(v, (int, float))
                               and not k.endswith(("_runtime", "_per_second"))}})
            eval_time += float(entry.get("eval_runtime", 0.0))
    best_ckpt = trainer.state.best_model_checkpoint
    best_step = int(best_ckpt.rsplit("-", 1)[1]) if best_ckpt else history[-1]["step"]
    best = next(h for h in history if h["step"] == best_step)
    test = None
    if "test" in tokenized:
        trainer.compute_metrics = None
        pred = trainer.predict(tokenized["test"])
        test = {**scores(pred.predictions, tokenized["test"]), "loss": float(pred.metrics.get("test_loss", float("nan"))),
                "examples": len(tokenized["test"])}
        eval_time += float(pred.metrics.get("test_runtime", 0.0))
    trainer.save_model(str(out / "model"))
    model_bytes = sum(f.stat().st_size for f in (out / "model").rglob("*") if f.is_file())

    train_time = timer.seconds
    resources = {
        "peak_rss_bytes": peak_rss_bytes(),
        "load_rss_bytes": load_rss,
        "load_peak_rss_bytes": load_peak,
        "train_time_s": round(train_time, 3),
        "eval_time_s": round(eval_time, 3),
        "wall_time_s": round(time.perf_counter() - wall0, 3),
        "train_samples": collator.samples,
        "train_tokens": collator.tokens,
        "samples_per_s": round(collator.samples / train_time, 3) if train_time else None,
        "tokens_per_s": round(collator.tokens / train_time, 3) if train_time else None,
        "optimizer_steps": trainer.state.global_step,
        "processes": trainer.args.world_size,
        "threads_per_process": torch.get_num_threads(),
        "device": str(trainer.args.device),
        "resumed": bool(resume and has_ckpt),
        "implementation": IMPLEMENTATION,
    }
    if torch.cuda.is_available() and trainer.args.device.type == "cuda":
        resources["cuda_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        resources["cuda_max_memory_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    params = {
        "method": method,
        "backbone_params": backbone_params,
        "head_params": head_params,
        "total_params": backbone_params + head_params,
        "method_added_params": max(0, sum(p.numel() for p in model.parameters()) - backbone_params - head_params),
        "trainable_params": t_all,
        "trainable_head_params": t_head,
        "trainable_params_without_head": t_all - t_head,
        "trainable_pct": round(100.0 * t_all / (backbone_params + head_params), 6),
        "trainable_pct_without_head": round(100.0 * (t_all - t_head) / backbone_params, 6),
        "head_modules": ["classifier"],
        "model_dir_bytes": model_bytes,
    }
    metrics = {
        "task": recipe.task,
        "method": method,
        "implementation": IMPLEMENTATION,
        "metric": metric,
        "best_step": best_step,
        "best_epoch": best["epoch"],
        "steps": trainer.state.global_step,
        "dev": best,
        "test": test,
        "history": history,
        "notes": notes,
    }
    write_text(out / "recipe.yaml", f"# resolved recipe, trained by {IMPLEMENTATION}\n"
               + yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True))
    write_json(out / "labels.json", label_list)
    write_json(out / "params.json", params)
    write_json(out / "resources.json", resources)
    write_json(out / "metrics.json", metrics)  # last: marks the run as complete
    print(f"done: {out} (dev {metric} {best[metric]:.4f} at epoch {best['epoch']}"
          + (f"; test {metric} {test[metric]:.4f})" if test else ")"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        sys.exit(main(sys.argv[1:]))
    except PeftlabError as exc:
        print(f"trainer_baseline: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
