#!/usr/bin/env bash
# All GPU measurements of the issues in one run (for a session with a lent GPU; ~10 minutes on an H100/H200):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Installs the package into a fresh venv if needed, prints the device, runs each benchmark with its own time
# limit (one failing or slow script does not stop the others) and writes every log to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
if ! python -c "import meddinov3_hf" 2>/dev/null; then
  python -m venv .venv-gpu && . .venv-gpu/bin/activate && pip install --quiet -e . >"$out/install.log" 2>&1
fi
python - <<'PY' | tee "$out/device.txt"
import torch
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
PY
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$out/summary.md"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1; echo "exit $?" >>"$out/$name.log"
  grep -E '^\||device:|MFU|ratio|speed-up|Workers' "$out/$name.log" | tee -a "$out/summary.md"
}
run model 200 python benchmarks/bench_model.py --compile
run volume 120 python benchmarks/bench_volume.py
run finetune 150 python benchmarks/bench_finetune.py
run pretrain 200 python benchmarks/bench_pretrain.py
