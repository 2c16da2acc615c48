#!/usr/bin/env bash
# The runs of the GPU check on an offline GPU machine (docs/GPU.md), from the repository root, one after each
# transfer prepared by `python benchmarks/gpu_prepare.py` (N = its --parts, default 2):
#   1: install the transferred wheels (.whl) into .pydeps and smoke-run gpu_check --tiny on the GPU (extra options
#      passed on); transfer 1 brings .whl and .gpu/a
#   2 .. N-1: check that transfer k's part of the GGUF (.gpu/b, .gpu/c, ...) arrived; nothing runs
#   N: join the GGUF from its N parts, check its SHA-256, run the full gpu_check (extra options passed on); transfer N
#      brings the last part and the data. .pydeps and the earlier parts must still be there from runs 1 .. N-1.
# Results go to $OUT (to be transferred back); by default ./gpu-check-out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
export PYTHONPATH="$PWD/.pydeps${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export QLORA_GA_GIT_COMMIT="$(cat .gpu/a/commit 2>/dev/null)"
PY="${PYTHON:-python3}"
LETTERS=(a b c d e f g h i j k l m n o p q r s t u v w x y z)
K="${1:-}"
if ! [[ "$K" =~ ^[0-9]+$ ]] || [ "$K" -lt 1 ] || [ "$K" -gt 26 ]; then
  echo "usage: bash benchmarks/gpu_run.sh K [extra gpu_check.py options for runs 1 and N], K = 1 .. N, one run after each transfer"
  exit 2
fi
DIR=".gpu/${LETTERS[$((K - 1))]}"
if [ "$K" -eq 1 ]; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "error: no wheels in .whl/: transfer .whl (run benchmarks/gpu_prepare.py first)"; exit 3; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .pydeps .whl/*.whl || exit 3
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" benchmarks/gpu_check.py --tiny --only env,bench,cli --budget-s 200 --out "$OUT" "${@:2}"
elif [ ! -f "$DIR/gguf.sha256" ]; then  # a part in between: only stored
  if [ ! -f "$DIR/gguf.part$K" ]; then
    echo "error: $DIR/gguf.part$K is missing: transfer $K did not bring $DIR"; exit 3
  fi
  echo "part $K of the GGUF is here ($DIR); next: transfer $((K + 1)), then bash benchmarks/gpu_run.sh $((K + 1))"
else  # the last transfer: join the parts and run the full check
  if [ ! -d .pydeps ]; then
    echo "error: .pydeps is missing: this machine has not kept what run 1 installed; make the transfers and runs again from 1"
    exit 3
  fi
  G="/tmp/$(cat "$DIR/gguf.name")"
  : > "$G"
  for ((i = 1; i <= K; i++)); do
    PART=".gpu/${LETTERS[$((i - 1))]}/gguf.part$i"
    if [ ! -f "$PART" ]; then
      echo "error: $PART is missing: this machine has not kept what transfer $i brought; make the transfers and runs again from 1"
      exit 3
    fi
    cat "$PART" >> "$G"
  done
  echo "$(cat "$DIR/gguf.sha256")  $G" | sha256sum -c - || { echo "error: the joined GGUF is damaged"; exit 3; }
  TRAIN=(--train-data "$(ls "$DIR"/gsm8k-train-*.jsonl)")
  [ -n "${NO_TRAIN_DATA:-}" ] && TRAIN=()  # the built-in arithmetic set (if datasets does not import there)
  "$PY" benchmarks/gpu_check.py --out "$OUT" --model "$G" ${TRAIN[@]+"${TRAIN[@]}"} --test-data "$(ls "$DIR"/gsm8k-test-*.jsonl)" "${@:2}"
fi
