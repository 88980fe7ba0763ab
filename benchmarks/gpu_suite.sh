#!/usr/bin/env bash
# qdpo vs TRL on one lent GPU, random-weight checkpoints of real shapes, in one command of ~8-10 minutes:
#   7B  (llama2-7b shape, vocab 32k)   1024-token pairs, micro-batch 1
#   7B  (llama2-7b shape)              2048-token pairs, micro-batch 1
#   8B  (llama3-8b shape, vocab 128k)  4096-token pairs, micro-batch 1
# each with qdpo and TRL's DPOTrainer, 6 optimizer steps (the first is warm-up; MFU and tokens/s use 2..6).
#
# The GPU box has no network and lacks bitsandbytes, trl and datasets: pack them here first, then carry them:
#   python benchmarks/pack_site.py                       # -> runs/bench-site (~14 MiB, git-ignored)
#   run(command="bash benchmarks/gpu_suite.sh", carry=["runs/bench-site"], timeout_s=600)
# Pass a part to split the work over two calls: `bash benchmarks/gpu_suite.sh 7b` then `... 8b`.
# Results: $OUT/<case>.json and $OUT/<case>.log (or runs/bench-results/ off the device), plus $OUT/env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."

PART=${1:-all}
STEPS=${STEPS:-6}
PY=${PYTHON:-python3}
SITE="$PWD/runs/bench-site"
[ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export QDPO_BENCH_CACHE=${QDPO_BENCH_CACHE:-/tmp/qdpo-bench}   # random 7B/8B checkpoints: 13.5 + 16 GB of disk
RESULTS=${OUT:-runs/bench-results}
mkdir -p "$RESULTS"

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" - <<'EOF'
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for n in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets", "tokenizers", "safetensors"):
    try:
        print(n, md.version(n))
    except md.PackageNotFoundError:
        print(n, "MISSING")
import torch, bitsandbytes, trl, datasets  # fail here, in seconds, rather than after writing 13 GB
print("cuda", torch.version.cuda, torch.cuda.get_device_name())
EOF
} 2>&1 | tee "$RESULTS/env.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "environment check failed (above): no GPU, or missing packages (run benchmarks/pack_site.py here and carry runs/bench-site)"; exit 2; }

status=0
bench() {  # bench NAME ARGS...: one comparison; a failure is recorded and the suite goes on
  local name=$1; shift
  echo "=== $name: $*"
  timeout 420 "$PY" benchmarks/compare_trl.py "$@" --data random --micro-batch 1 --steps "$STEPS" \
      --timeout 240 --out "$RESULTS/$name.json" 2>&1 | tee "$RESULTS/$name.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

if [ "$PART" = all ] || [ "$PART" = 7b ]; then
  bench 7b-1024 --shape llama2-7b --seq-len 1024
  bench 7b-2048 --shape llama2-7b --seq-len 2048
  rm -rf "$QDPO_BENCH_CACHE"/models/llama2-7b-*   # frees 13.5 GB of disk before the 8B checkpoint
fi
if [ "$PART" = all ] || [ "$PART" = 8b ]; then
  bench 8b-4096 --shape llama3-8b --seq-len 4096
fi
exit $status
