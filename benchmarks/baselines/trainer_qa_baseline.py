"""Baseline: a question-answering recipe trained by a plain transformers ``Trainer`` script (+ peft for LoRA).

    python benchmarks/baselines/trainer_qa_baseline.py RECIPE [key=value ...] output.dir=DIR [--resume]

Written the way the transformers question-answering example (``run_qa.py`` with ``trainer_qa.py`` and
``utils_qa.py``) teaches it: ``prepare_train_features`` (question + context, ``truncation="only_second"``,
``return_overflowing_tokens`` with ``stride``, answers mapped through ``offset_mapping``, ``[CLS]`` when
a window lacks the answer), ``prepare_validation_features`` (``example_id`` and context-only
offsets), a ``Trainer`` subclass whose ``evaluate`` post-processes with ``postprocess_qa_predictions``
(the ``n_best_size`` best start and end logits of every window, summed logits, ``max_answer_length``)
and per-epoch evaluation with ``load_best_model_at_end``. Scores: SQuAD v1.1 exact match and F1
(``peftlab.metrics.squad_scores``, the official script's arithmetic; the example loads the same metric
with ``evaluate.load("squad")``, which needs the hub). From peftlab it takes the recipe, the data rows
(the same files and held-out articles) and the backbone folder, as ``trainer_baseline.py`` does, and it
writes the same files. LoRA goes through peft's ``get_peft_model`` exactly as a user's script would.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from datasets import Dataset
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (AutoModelForQuestionAnswering, AutoTokenizer, DataCollatorWithPadding, TrainingArguments,
                          set_seed)

from trainer_baseline import CountingCollator, SequentialEvalTrainer, TrainTime, peak_rss_bytes, rss_bytes  # same folder

from peftlab.atomicio import write_json, write_text
from peftlab.backbones import resolve_backbone
from peftlab.errors import PeftlabError
from peftlab.metrics import squad_scores
from peftlab.recipe import load_recipe
from peftlab.tasks import get_task_class

IMPLEMENTATION = "transformers.Trainer, question-answering example (benchmarks/baselines/trainer_qa_baseline.py)"
N_BEST_SIZE = 20  # the example's default


def postprocess_qa_predictions(examples, features, start_logits, end_logits, max_answer_length):
    """utils_qa.postprocess_qa_predictions for SQuAD v1 (every question has an answer)."""
    feature_index = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        feature_index[example_id].append(i)
    answers = {}
    for example in examples:
        context, best = example["context"], None
        for i in feature_index[example["id"]]:
            offsets = features[i]["offset_mapping"]
            for s in np.argsort(start_logits[i])[-1:-N_BEST_SIZE - 1:-1].tolist():
                for e in np.argsort(end_logits[i])[-1:-N_BEST_SIZE - 1:-1].tolist():
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = start_logits[i][s] + end_logits[i][e]
                    if best is None or score > best[0]:
                        best = (score, context[offsets[s][0]:offsets[e][1]])
        answers[example["id"]] = best[1] if best else ""
    return answers


class QuestionAnsweringTrainer(SequentialEvalTrainer):
    """trainer_qa.QuestionAnsweringTrainer: evaluation predicts window logits, then post-processes
    (windows in dataset order: transformers 5 would length-group the evaluation sampler too)."""

    def __init__(self, *args, eval_examples=None, post_process=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_examples, self.post_process = eval_examples, post_process

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval", examples=None):
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        examples = self.eval_examples if examples is None else examples
        t0 = time.perf_counter()
        output = self.predict_windows(dataset)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.post_process(examples, dataset, output).items()}
        metrics[f"{metric_key_prefix}_loss"] = output.metrics.get("test_loss", float("nan"))
        metrics[f"{metric_key_prefix}_runtime"] = time.perf_counter() - t0
        metrics["epoch"] = self.state.epoch
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def predict_windows(self, dataset):
        for_model = dataset.remove_columns(["example_id", "offset_mapping"])
        compute, self.compute_metrics = self.compute_metrics, None
        try:
            return self.predict(for_model)
        finally:
            self.compute_metrics = compute


def main(argv: list[str]) -> int:
    resume = "--resume" in argv
    args = [a for a in argv if a != "--resume"]
    if not args:
        print("usage: trainer_qa_baseline.py RECIPE [key=value ...] output.dir=DIR [--resume]", file=sys.stderr)
        return 2
    wall0 = time.perf_counter()
    recipe = load_recipe(args[0], args[1:])
    cfg, data_cfg = recipe.train, recipe.data
    if recipe.task != "question_answering" or recipe.method.name not in ("full", "lora"):
        raise PeftlabError(f"{recipe.source}: the QA Trainer baseline implements question_answering with full and lora")
    if recipe.backbone.quantization != "none":
        raise PeftlabError(f"{recipe.source}: backbone.quantization: the Trainer baseline trains unquantized backbones")
    out = Path(recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)

    # ---- data: the same rows (and held-out articles) peftlab reads
    task = get_task_class("question_answering")(recipe)
    opts = task.options
    splits = task.load_splits()

    def to_dataset(rows):
        return Dataset.from_dict({
            "id": [str(i) for i in range(len(rows))], "question": [r[opts.question_column] for r in rows],
            "context": [r[opts.context_column] for r in rows],
            "answers": [{"text": [a["text"] for a in r[opts.answers_column]],
                         "answer_start": [a["answer_start"] for a in r[opts.answers_column]]} for r in rows]})

    raw = {"train": to_dataset(splits.train), "validation": to_dataset(splits.validation)}
    if splits.test is not None:
        raw["test"] = to_dataset(splits.test)
    path = resolve_backbone(recipe.backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_on_right = tokenizer.padding_side == "right"
    max_len, stride = data_cfg.max_length, opts.doc_stride

    def tokenize_windows(examples):  # the example's tokenizer call, shared by both preparations
        examples["question"] = [q.lstrip() for q in examples["question"]]
        return tokenizer(examples["question" if pad_on_right else "context"],
                         examples["context" if pad_on_right else "question"],
                         truncation="only_second" if pad_on_right else "only_first", max_length=max_len,
                         stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)

    def prepare_train_features(examples):
        tokenized = tokenize_windows(examples)
        sample_mapping = tokenized.pop("overflow_to_sample_mapping")
        offset_mapping = tokenized.pop("offset_mapping")
        tokenized["start_positions"], tokenized["end_positions"] = [], []
        for i, offsets in enumerate(offset_mapping):
            input_ids = tokenized["input_ids"][i]
            cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
            sequence_ids = tokenized.sequence_ids(i)
            answers = examples["answers"][sample_mapping[i]]
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            token_start = 0
            while sequence_ids[token_start] != (1 if pad_on_right else 0):
                token_start += 1
            token_end = len(input_ids) - 1
            while sequence_ids[token_end] != (1 if pad_on_right else 0):
                token_end -= 1
            if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
                tokenized["start_positions"].append(cls_index)
                tokenized["end_positions"].append(cls_index)
                continue
            while token_start < len(offsets) and offsets[token_start][0] <= start_char:
                token_start += 1
            tokenized["start_positions"].append(token_start - 1)
            while offsets[token_end][1] >= end_char:
                token_end -= 1
            tokenized["end_positions"].append(token_end + 1)
        return tokenized

    def prepare_validation_features(examples):
        tokenized = tokenize_windows(examples)
        sample_mapping = tokenized.pop("overflow_to_sample_mapping")
        tokenized["example_id"] = []
        for i in range(len(tokenized["input_ids"])):
            sequence_ids = tokenized.sequence_ids(i)
            context_index = 1 if pad_on_right else 0
            tokenized["example_id"].append(examples["id"][sample_mapping[i]])
            tokenized["offset_mapping"][i] = [o if sequence_ids[k] == context_index else None
                                              for k, o in enumerate(tokenized["offset_mapping"][i])]
        return tokenized

    columns = raw["train"].column_names
    train_features = raw["train"].map(prepare_train_features, batched=True, remove_columns=columns)
    eval_features = {k: raw[k].map(prepare_validation_features, batched=True, remove_columns=columns)
                     for k in raw if k != "train"}

    # ---- model (+ peft)
    model = AutoModelForQuestionAnswering.from_pretrained(path, use_safetensors=True)
    head_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("qa_outputs"))
    backbone_params = sum(p.numel() for p in model.parameters()) - head_params
    if recipe.method.name == "lora":
        o = recipe.method_options
        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.QUESTION_ANS, r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout,
            target_modules=o.target_modules, bias=o.bias, use_dora=o.use_dora, use_rslora=o.use_rslora,
            modules_to_save=["qa_outputs", *o.modules_to_save]))
    load_rss, load_peak = rss_bytes(), peak_rss_bytes()
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    t_all = sum(trainable.values())
    t_head = sum(v for n, v in trainable.items() if "qa_outputs" in n)

    def post_process(examples, features, output) -> dict:
        start_logits, end_logits = output.predictions
        answers = postprocess_qa_predictions(examples, features, start_logits, end_logits, opts.max_answer_length)
        return squad_scores([answers[ex["id"]] for ex in examples], [ex["answers"]["text"] for ex in examples])

    # ---- training arguments from the recipe
    metric = cfg.metric or "f1"
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio
    # the example's --pad_to_max_length False (dynamic padding; its default pads every window to max_length)
    collator = CountingCollator(DataCollatorWithPadding(tokenizer))
    args_tr = TrainingArguments(
        output_dir=str(out / "trainer"), learning_rate=cfg.lr, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size, gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, weight_decay=cfg.weight_decay,
        warmup_steps=warmup,
        lr_scheduler_type={"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.scheduler],
        max_grad_norm=cfg.max_grad_norm or 0.0, eval_strategy="epoch", save_strategy="epoch",
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        load_best_model_at_end=True, metric_for_best_model=metric, greater_is_better=metric != "loss",
        save_total_limit=cfg.keep_checkpoints, logging_steps=cfg.log_every, seed=cfg.seed,
        bf16=cfg.mixed_precision == "bf16", fp16=cfg.mixed_precision == "fp16",
        gradient_checkpointing=cfg.gradient_checkpointing, report_to="none", push_to_hub=False)
    timer = TrainTime(collator)
    trainer = QuestionAnsweringTrainer(
        model=model, args=args_tr, train_dataset=train_features, eval_dataset=eval_features["validation"],
        eval_examples=raw["validation"], post_process=post_process, processing_class=tokenizer,
        data_collator=collator, callbacks=[timer])
    has_ckpt = any((out / "trainer").glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if (resume and has_ckpt) else None)

    # ---- best model (restored by load_best_model_at_end), dev entry, test
    history, eval_time = [], 0.0
    for entry in trainer.state.log_history:
        if f"eval_{metric}" in entry:
            history.append({"epoch": max(1, math.ceil(entry["epoch"] - 1e-9)), "step": entry["step"],
                            **{k[5:]: v for k, v in entry.items() if k.startswith("eval_")
                               and isinstance(v, (int, float)) and not k.endswith("_runtime")}})
            eval_time += float(entry.get("eval_runtime", 0.0))
    best_ckpt = trainer.state.best_model_checkpoint
    best_step = int(best_ckpt.rsplit("-", 1)[1]) if best_ckpt else history[-1]["step"]
    best = next(h for h in history if h["step"] == best_step)
    test = None
    if "test" in raw:
        t0 = time.perf_counter()
        output = trainer.predict_windows(eval_features["test"])
        test = {**post_process(raw["test"], eval_features["test"], output),
                "loss": float(output.metrics.get("test_loss", float("nan"))), "examples": len(raw["test"]),
                "windows": len(eval_features["test"])}
        eval_time += time.perf_counter() - t0
    trainer.save_model(str(out / "model"))
    write_outputs(out, recipe, trainer, collator, timer, wall0, eval_time, load_rss, load_peak, resume and has_ckpt,
                  {"backbone": backbone_params, "head": head_params, "trainable": t_all, "trainable_head": t_head,
                   "all": sum(p.numel() for p in model.parameters())},
                  {"metric": metric, "best_step": best_step, "best": best, "test": test, "history": history})
    print(f"done: {out} (dev {metric} {best[metric]:.4f} at epoch {best['epoch']}"
          + (f"; test {metric} {test[metric]:.4f})" if test else ")"), file=sys.stderr)
    return 0


def write_outputs(out, recipe, trainer, collator, timer, wall0, eval_time, load_rss, load_peak, resumed, counts, result):
    """metrics.json, params.json, resources.json, recipe.yaml: the files ``peftlab train`` writes."""
    train_time = timer.seconds
    model_bytes = sum(f.stat().st_size for f in (out / "model").rglob("*") if f.is_file())
    resources = {
        "peak_rss_bytes": peak_rss_bytes(), "load_rss_bytes": load_rss, "load_peak_rss_bytes": load_peak,
        "train_time_s": round(train_time, 3), "eval_time_s": round(eval_time, 3),
        "wall_time_s": round(time.perf_counter() - wall0, 3), "train_samples": collator.samples,
        "train_tokens": collator.tokens,
        "samples_per_s": round(collator.samples / train_time, 3) if train_time else None,
        "tokens_per_s": round(collator.tokens / train_time, 3) if train_time else None,
        "optimizer_steps": trainer.state.global_step, "processes": trainer.args.world_size,
        "threads_per_process": torch.get_num_threads(), "device": str(trainer.args.device),
        "resumed": bool(resumed), "implementation": IMPLEMENTATION,
    }
    backbone, head, t_all, t_head = counts["backbone"], counts["head"], counts["trainable"], counts["trainable_head"]
    params = {
        "method": recipe.method.name, "backbone_params": backbone, "head_params": head, "total_params": backbone + head,
        "method_added_params": max(0, counts["all"] - backbone - head), "trainable_params": t_all,
        "trainable_head_params": t_head, "trainable_params_without_head": t_all - t_head,
        "trainable_pct": round(100.0 * t_all / (backbone + head), 6),
        "trainable_pct_without_head": round(100.0 * (t_all - t_head) / backbone, 6),
        "head_modules": ["qa_outputs"], "model_dir_bytes": model_bytes,
    }
    best = result["best"]
    metrics = {"task": recipe.task, "method": recipe.method.name, "implementation": IMPLEMENTATION,
               "metric": result["metric"], "best_step": result["best_step"], "best_epoch": best["epoch"],
               "steps": trainer.state.global_step, "dev": best, "test": result["test"], "history": result["history"],
               "notes": []}
    write_text(out / "recipe.yaml", f"# resolved recipe, trained by {IMPLEMENTATION}\n"
               + yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True))
    write_json(out / "labels.json", [])
    write_json(out / "params.json", params)
    write_json(out / "resources.json", resources)
    write_json(out / "metrics.json", metrics)  # last: marks the run as complete


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        sys.exit(main(sys.argv[1:]))
    except PeftlabError as exc:
        print(f"trainer_qa_baseline: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
