#!/usr/bin/env bash
# Training throughput side by side: the CPU engine's training step (examples/bench_train.rs)
# and PyTorch eager CPU (tools/torch_reference.py bench) on the same shapes and thread count.
# Usage: tools/bench_train.sh [THREADS] [PYTHON] [PATCH] [PATCHES] [BAGS]
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
python="${2:-python3}"
patch="${3:-112}"
patches="${4:-16}"
bags="${5:-2}"
out=target/bench_train
mkdir -p "$out"
cargo build --release --example bench_train
RAYON_NUM_THREADS="$threads" target/release/examples/bench_train --preset paper --patch "$patch" \
  --patches "$patches" --bags "$bags" --iters 5 > "$out/rust.json"
"$python" tools/torch_reference.py bench --threads "$threads" --preset paper --patch "$patch" \
  --patches "$patches" --bags "$bags" --iters 5 --warmup 1 --json "$out/torch.json" > /dev/null
"$python" - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rust = json.load(open(f"{out}/rust.json"))
torch = json.load(open(f"{out}/torch.json"))
torch_pps = torch["patches"] / (torch["train_ms"] / 1e3)
print(f"training step, paper preset P={rust['patch']}, {rust['patches']} patches in bags {rust['bags']}, "
      f"{rust['threads']} threads (torch {torch['torch']}, {torch['threads']} threads)")
print(f"{'engine':<12}{'ms/step':>10}{'patches/s':>12}")
print(f"{'cpu engine':<12}{rust['train_ms']:>10.1f}{rust['patches_per_s']:>12.2f}")
print(f"{'pytorch':<12}{torch['train_ms']:>10.1f}{torch_pps:>12.2f}")
print(f"ratio (cpu engine / pytorch patches/s): {rust['patches_per_s'] / torch_pps:.2f}")
PY
