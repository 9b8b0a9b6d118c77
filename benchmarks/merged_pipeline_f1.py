"""WNUT-17 test entity F1 through ``transformers.pipeline("token-classification",
aggregation_strategy="simple")``: the merged checkpoint (plain transformers, no peft import) vs the
run it came from (base + adapter, loaded by peftlab), on the same sentences, scored the same way.

    python benchmarks/merged_pipeline_f1.py runs/lora_ner merged/lora_ner [--out FILE.json]

Each test sentence is joined with single spaces; every entity span the pipeline returns tags the
words it overlaps (B- on the first, I- on the rest); seqeval scores those word tags against the gold
tags. (peftlab's own evaluator scores first sub-tokens instead, so this F1 can differ from the
run's metrics.json; what must hold is that merged and unmerged give the same predictions.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCORE = r'''
import json, sys
from seqeval.metrics import f1_score, precision_score, recall_score
from transformers import pipeline

model_arg, sentences_file = sys.argv[1], sys.argv[2]
sents = json.loads(open(sentences_file).read())
if model_arg.startswith("run:"):
    from peftlab.runs import load_run
    run = load_run(model_arg[4:])
    model, tokenizer = run.model, run.tokenizer
    model.eval()
    ner = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="simple")
else:
    ner = pipeline("token-classification", model=model_arg, aggregation_strategy="simple")
texts, spans = [], []
for s in sents:
    pos, offs = 0, []
    for w in s["tokens"]:
        offs.append((pos, pos + len(w)))
        pos += len(w) + 1
    texts.append(" ".join(s["tokens"]))
    spans.append(offs)
preds = []
outs = ner(texts, batch_size=32)
for offs, ents in zip(spans, outs):
    tags = ["O"] * len(offs)
    for e in ents:
        inside = [i for i, (a, b) in enumerate(offs) if a < e["end"] and e["start"] < b]
        for k, i in enumerate(inside):
            if tags[i] == "O":
                tags[i] = ("B-" if k == 0 else "I-") + e["entity_group"]
    preds.append(tags)
gold = [s["tags"] for s in sents]
print(json.dumps({"f1": f1_score(gold, preds), "precision": precision_score(gold, preds),
                  "recall": recall_score(gold, preds), "entities_predicted": sum(len(o) for o in outs),
                  "peft_imported": "peft" in sys.modules, "predictions": preds}))
'''


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("merged")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from peftlab.atomicio import write_json
    from peftlab.runs import load_run

    run = load_run(args.run)
    sents = run.task.load_splits().test
    tmp = Path(args.merged) / ".pipeline_sentences.json"
    tmp.write_text(json.dumps([{"tokens": s["tokens"], "tags": s["tags"]} for s in sents]))
    try:
        res = {}
        for name, model_arg in (("merged", str(args.merged)), ("unmerged", f"run:{args.run}")):
            out = subprocess.run([sys.executable, "-c", SCORE, model_arg, str(tmp)], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            res[name] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        tmp.unlink(missing_ok=True)
    same = res["merged"].pop("predictions") == res["unmerged"].pop("predictions")
    report = {"command": " ".join(["python", "benchmarks/merged_pipeline_f1.py", *(argv or sys.argv[1:])]),
              "sentences": len(sents), "identical_predictions": same,
              "run_metrics_json_test_f1": json.loads((Path(args.run) / "metrics.json").read_text())["test"]["f1"],
              **res}
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)
    return 0 if same and not report["merged"]["peft_imported"] else 1


if __name__ == "__main__":
    sys.exit(main())
