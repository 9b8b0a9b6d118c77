"""Does a merged question-answering checkpoint answer like the run it came from, without peftlab?

    python benchmarks/merged_qa_answers.py RUN_DIR MERGED_DIR [--questions 200] [--out FILE]

transformers 5 has no question-answering pipeline, so the merged side is answered here by a plain
transformers + torch decoder written apart from peftlab (run in its own process, which checks that
peftlab was never imported): the pipeline's algorithm, i.e. question + context windows
(``truncation="only_second"``, the recipe's ``max_length`` and ``doc_stride``), the best span
inside the context of at most ``max_answer_length`` tokens by start logit + end logit, the best
window by the same sum. The run side is ``peftlab predict RUN_DIR`` (base + adapter).
The first N questions of the recipe's test file are compared; the result (agreement, both sides'
SQuAD exact match and F1, every disagreement) is written as JSON (default:
benchmarks/results/squad11_merged_answers.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def standalone_answers(merged: str, questions_file: str) -> list[dict]:
    """Answers from the merged checkpoint with transformers and torch only."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    info = json.loads((Path(merged) / "peftlab_merge.json").read_text(encoding="utf-8"))["recipe"]
    max_length, stride = info["data"]["max_length"], info["task_options"]["doc_stride"]
    max_answer = info["task_options"]["max_answer_length"]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForQuestionAnswering.from_pretrained(merged).eval()
    out = []
    for line in Path(questions_file).read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        enc = tokenizer(item["question"].strip(), item["context"], truncation="only_second", max_length=max_length,
                        stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                        padding=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping")
        enc.pop("overflow_to_sample_mapping")
        with torch.no_grad():
            res = model(**enc)
        best = (float("-inf"), 0, 0)
        for w in range(offsets.shape[0]):
            ctx = torch.tensor([s == 1 for s in enc.sequence_ids(w)])
            n = ctx.shape[0]
            ok = torch.ones(n, n, dtype=torch.bool).triu().tril(max_answer - 1) & ctx[:, None] & ctx[None, :]
            scores = (res.start_logits[w][:, None] + res.end_logits[w][None, :]).masked_fill(~ok, float("-inf"))
            flat = int(scores.argmax())
            if float(scores.view(-1)[flat]) > best[0]:
                i, j = divmod(flat, n)
                best = (float(scores.view(-1)[flat]), int(offsets[w, i, 0]), int(offsets[w, j, 1]))
        out.append({"answer": item["context"][best[1]:best[2]], "start": best[1], "end": best[2]})
    assert "peftlab" not in sys.modules, "the merged side must not import peftlab"
    return out


def test_questions(recipe_path: Path, n: int) -> list[dict]:
    """The first ``n`` questions of the run's test file (SQuAD JSON), with their reference answers."""
    import yaml

    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    doc = json.loads(Path(recipe["data"]["test"]).read_text(encoding="utf-8"))
    items = [{"id": qa["id"], "question": qa["question"], "context": p["context"],
              "references": [a["text"] for a in qa["answers"]]}
             for article in doc["data"] for p in article["paragraphs"] for qa in p["qas"]]
    return items[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("merged_dir")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/squad11_merged_answers.json")
    ap.add_argument("--standalone", help=argparse.SUPPRESS)  # internal: the merged side, in its own process
    args = ap.parse_args()
    if args.standalone:
        print(json.dumps(standalone_answers(args.merged_dir, args.standalone)))
        return 0
    items = test_questions(Path(args.run_dir) / "recipe.yaml", args.questions)
    with tempfile.TemporaryDirectory() as tmp:
        qfile = Path(tmp) / "questions.jsonl"
        qfile.write_text("".join(json.dumps({k: it[k] for k in ("id", "question", "context")}) + "\n" for it in items),
                         encoding="utf-8")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        merged = json.loads(subprocess.run([sys.executable, __file__, args.run_dir, args.merged_dir, "--standalone",
                                            str(qfile)], check=True, capture_output=True, text=True, env=env).stdout)
        run = [json.loads(line) for line in subprocess.run(
            [sys.executable, "-m", "peftlab.cli", "predict", args.run_dir, "--input", str(qfile)], check=True,
            capture_output=True, text=True, env=env).stdout.splitlines()]
    from peftlab.atomicio import write_text
    from peftlab.bench.provenance import git_info, versions
    from peftlab.metrics import squad_scores

    refs = [it["references"] for it in items]
    differ = [{"id": it["id"], "run": r["answer"], "merged": m["answer"]} for it, r, m in zip(items, run, merged)
              if (r["answer"], r["start"], r["end"]) != (m["answer"], m["start"], m["end"])]
    result = {"run": os.path.relpath(args.run_dir), "merged": os.path.relpath(args.merged_dir), "questions": len(items),
              "same_answer_and_span": len(items) - len(differ),
              "run_scores": squad_scores([r["answer"] for r in run], refs),
              "merged_scores": squad_scores([m["answer"] for m in merged], refs), "differences": differ,
              "code": git_info(), "versions": versions(),
              "command": "python benchmarks/merged_qa_answers.py " + " ".join(sys.argv[1:])}
    write_text(args.out, json.dumps(result, indent=2) + "\n")  # atomic: never a half-written file
    print(f"{result['same_answer_and_span']}/{len(items)} identical answers; written to {args.out}")
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
