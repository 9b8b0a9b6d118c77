"""``peftlab predict`` on the command line: inputs from arguments or a file, JSON lines out
(the predictions themselves: :mod:`peftlab.predict`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import PeftlabError
from .predict import PathLike, Predictor, load_predictor, predict, predict_labels
from .util import read_utf8


# ----------------------------------------------------------------------------------------- input


def read_inputs(path: PathLike, text_field: str = "text") -> list:
    """Texts from a file: JSONL (one object per line with ``text_field``) or one text per line. A JSONL
    object with ``question`` and ``context`` (and no ``text_field``) is one question-answering input."""
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"--input: file not found: {path}")
    lines = read_utf8(path, "--input must be UTF-8 (JSONL, or one text per line)").splitlines()
    first = next((line for line in lines if line.strip()), "")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or first.lstrip().startswith("{")
    texts = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PeftlabError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if isinstance(obj, dict) and text_field not in obj and {"question", "context"} <= set(obj):
            texts.append({k: obj[k] for k in ("id", "question", "context") if k in obj})  # question answering
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
            if isinstance(obj, dict) and {"question", "context"} & set(obj):  # half a question-answering input
                raise PeftlabError(f"{path}:{lineno}: a question-answering input needs both 'question' and "
                                   f"'context' (found {keys})")
            raise PeftlabError(f"{path}:{lineno}: expected an object with a string '{text_field}' (found {keys}); "
                               f"set --text-field")
        texts.append(obj[text_field])
    if not texts:
        raise PeftlabError(f"--input: no texts in {path}")
    return texts


# ------------------------------------------------------------------------------------------- CLI


def add_commands(sub: Any, command: Callable) -> None:
    """Register ``peftlab predict`` (called by peftlab.cli)."""
    p = sub.add_parser(
        "predict",
        description="NER: one JSON line per text with its entities (text, type, start, end, score). "
        "Classification: one JSON line per text with the label and its probability. Question answering: "
        "one JSON line per question with the answer, its character span in the context and its score.",
    )
    p.add_argument("model_dir", help="run folder, `peftlab export` folder or merged checkpoint")
    p.add_argument("texts", nargs="*", help="texts to predict (or use --input)")
    p.add_argument("--input", help="file: one text per line, or JSONL with a text field (question answering: "
                   "JSONL with question and context fields)")
    p.add_argument("--question", help="question answering: the question (with --context)")
    p.add_argument("--context", help="question answering: the text that holds the answer (with --question)")
    p.add_argument("--text-field", default="text", help="JSONL key of the text (default: text)")
    p.add_argument("--output", help="write the JSON lines to this file (atomically) instead of stdout")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--top-k", type=int, default=1, help="classification: also list the k most likely labels")
    command("predict")(_predict_cmd)


def _predict_cmd(args: argparse.Namespace) -> int:
    texts: list = list(args.texts)
    if (args.question is None) != (args.context is None):
        raise PeftlabError("command line: --question and --context go together (question answering)")
    if args.question is not None:
        texts.append({"question": args.question, "context": args.context})
    if args.input:
        texts += read_inputs(args.input, args.text_field)
    if not texts:
        raise PeftlabError("command line: give texts to predict or --input FILE (see `peftlab predict --help`)")
    if args.top_k < 1:
        raise PeftlabError("--top-k: expected a positive number")
    if args.batch_size < 1:
        raise PeftlabError("--batch-size: expected a positive number")
    if args.output and Path(args.output).is_dir():
        raise PeftlabError(f"--output: {args.output} is a folder; expected the path of a file to write")
    predictor = load_predictor(args.model_dir)
    if predictor.task == "sequence_classification" and args.top_k > 1:
        rows = _with_top_k(predictor, texts, args)
    else:
        rows = predict(predictor, texts, batch_size=args.batch_size, progress=bool(args.input))
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.output:
        from .atomicio import write_text

        write_text(args.output, lines)
        print(f"predict: {len(rows)} prediction(s) written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def _with_top_k(predictor: Predictor, texts: list[str], args: argparse.Namespace) -> list[dict]:
    bar = None
    if args.input:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="predict", unit="text", file=sys.stderr, dynamic_ncols=True)
    try:
        return predict_labels(predictor, texts, args.batch_size, bar.update if bar else None, top_k=args.top_k)
    finally:
        if bar is not None:
            bar.close()
