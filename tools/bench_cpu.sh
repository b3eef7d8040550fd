#!/usr/bin/env bash
# Side-by-side CPU benchmark: the Rust CPU engine (criterion) and PyTorch eager on the same
# shapes and thread count, in one run; prints ms, GFLOP/s and the speed ratio.
# Usage: tools/bench_cpu.sh [THREADS] [PYTHON]   (PYTHON needs torch, numpy, safetensors)
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
python="${2:-python3}"
out=target/bench_cpu
mkdir -p "$out"
RAYON_NUM_THREADS="$threads" cargo bench --bench cpu_engine
for m in 2 8; do
  bags=$(( m < 4 ? 1 : 2 ))
  "$python" tools/torch_reference.py bench --threads "$threads" --preset paper --patches "$m" --bags "$bags" \
    --iters 3 --warmup 1 --json "$out/torch_m$m.json"
done
"$python" - "$threads" <<'PY'
import json, sys
threads = sys.argv[1]
print(f"\nCPU engine vs PyTorch eager, paper preset P=256, {threads} threads (ratio > 1: Rust faster)")
print(f"{'case':<22}{'rust ms':>10}{'torch ms':>10}{'rust GFLOP/s':>14}{'torch GFLOP/s':>15}{'ratio':>8}")
for m in (2, 8):
    torch = json.load(open(f"target/bench_cpu/torch_m{m}.json"))
    gflop = torch["forward_gflop"]
    for step, mult in (("eval_forward", 1), ("train_step", 3)):
        est = json.load(open(f"target/criterion/cpu_paper_p256_m{m}/{step}/new/estimates.json"))
        rust_ms = est["median"]["point_estimate"] / 1e6
        torch_ms = torch["eval_ms" if step == "eval_forward" else "train_ms"]
        print(f"{step + f' M={m}':<22}{rust_ms:>10.1f}{torch_ms:>10.1f}"
              f"{mult * gflop / rust_ms * 1e3:>14.1f}{mult * gflop / torch_ms * 1e3:>15.1f}{torch_ms / rust_ms:>8.2f}")
PY
