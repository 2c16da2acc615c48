#!/usr/bin/env bash
# The two runs of the GPU check (docs/GPU.md), run on the GPU machine from the repository root
# after `python scripts/gpu_prepare.py` here:
#   1: install the carried wheels into .pydeps, join nothing yet, smoke-run gpu_check --tiny on the GPU (extra options passed on)
#      (carry .whl and .gpu/a)
#   2: join the GGUF, check its SHA-256, run the full gpu_check (carry .gpu/b; .pydeps and .gpu/a are
#      still there if the machine stayed warm since call 1)
# Results go to $OUT (copied back afterwards); elsewhere to ./gpu-check-out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
export PYTHONPATH="$PWD/.pydeps${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export QLORA_GA_GIT_COMMIT="$(cat .gpu/a/commit 2>/dev/null)"
PY="${PYTHON:-python3}"
case "${1:-}" in
  1)
    ls .whl/*.whl >/dev/null 2>&1 || { echo "error: no wheels in .whl/: carry .whl (run scripts/gpu_prepare.py first)"; exit 3; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .pydeps .whl/*.whl || exit 3
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" scripts/gpu_check.py --tiny --only env,bench,cli --budget-s 200 --out "$OUT" "${@:2}"
    ;;
  2)
    if [ ! -d .pydeps ] || [ ! -f .gpu/a/gguf.part1 ]; then
      echo "error: .pydeps or .gpu/a is missing: the machine is a fresh one; make call 1 again, then call 2 right after it"
      exit 3
    fi
    G="/tmp/$(cat .gpu/b/gguf.name)"
    cat .gpu/a/gguf.part1 .gpu/b/gguf.part2 > "$G"
    echo "$(cat .gpu/b/gguf.sha256)  $G" | sha256sum -c - || { echo "error: the joined GGUF is damaged"; exit 3; }
    TRAIN=(--train-data "$(ls .gpu/b/gsm8k-train-*.jsonl)")
    [ -n "${NO_TRAIN_DATA:-}" ] && TRAIN=()  # the built-in arithmetic set (if datasets does not import there)
    "$PY" scripts/gpu_check.py --out "$OUT" --model "$G" ${TRAIN[@]+"${TRAIN[@]}"} --test-data "$(ls .gpu/b/gsm8k-test-*.jsonl)" "${@:2}"
    ;;
  *)
    echo "usage: bash scripts/gpu_run.sh 1|2 [extra gpu_check.py options for 2]"; exit 2
    ;;
esac
