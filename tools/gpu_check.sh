#!/usr/bin/env bash
# GPU check: runs the prebuilt CUDA test binaries on a real GPU (CUDA engine vs references),
# then times the eval forward of the paper preset (P=256; 8, 32, 128 patches) with CUDA events
# against PyTorch on the same GPU (fp16, channels_last, cudnn.benchmark; and torch.compile),
# and the mixed-precision training step (P=256 with 4 bags of 8; the default weights' recipe,
# P=112 with 2 bags of 8) against PyTorch AMP (fp16 autocast, GradScaler, fused AdamW,
# channels_last, cudnn.benchmark) eager and under torch.compile, and `m2unet assess` of a
# 512×512×300 phantom with paper-preset weights; prints ms, TFLOP/s, % of the measured fp16
# peak and the ratios as a table (≤ 10 minutes: every step has its own limit).
#
# The GPU machine needs CUDA's driver, Python 3 with torch; no Rust. Two steps:
#   on a build machine (Rust, nvcc found by build.rs, e.g. tools/install_cuda_wheels.sh):
#     tools/gpu_check.sh collect BIN_DIR     # builds the binaries, packs them (xz) + this script
#   on the GPU machine:
#     BIN_DIR/gpu_check.sh run BIN_DIR OUT_DIR [STEPS]   # OUT_DIR gets log.txt, table.md
# STEPS (a comma list; default all, in this order): ops, perf, torch, autotune, train, tests,
# assess, bench. The first three fit one 10-minute call with room to spare.
set -uo pipefail

collect() {
  local dir="$1"
  cd "$(dirname "$0")/.."
  mkdir -p "$dir"
  for kind in test bench; do
    local flag="--tests"; [ "$kind" = bench ] && flag="--benches"
    local profile_cmd=(cargo test --release --no-run "$flag" --message-format=json)
    [ "$kind" = bench ] && profile_cmd=(cargo bench --no-run --message-format=json)
    "${profile_cmd[@]}" 2>/dev/null | python3 -c '
import json, shutil, sys
dst = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    name = m.get("target", {}).get("name", "")
    if exe and (name.startswith("cuda_") or name == "ops_table"):
        suffix = "_bench" if "bench" in m["target"]["kind"] else ""
        shutil.copy(exe, f"{dst}/{name}{suffix}")
        print("collected", name + suffix)
' "$dir" || exit 1
  done
  cargo build --release --bin m2unet 2>/dev/null && cp target/release/m2unet "$dir/" && echo "collected m2unet"
  # Fully stripped and xz-packed: the folder travels to the GPU machine within a 64 MiB limit
  # (the stripped binaries alone are about 65 MB); `run` unpacks them.
  local bins=()
  for f in "$dir"/*; do
    if [ -x "$f" ] && [ "${f##*.}" != sh ]; then
      strip --strip-all "$f" 2>/dev/null
      bins+=("$(basename "$f")")
    fi
  done
  (cd "$dir" && tar -cJf bins.tar.xz --remove-files "${bins[@]}") || exit 1
  cp tools/gpu_check.sh tools/torch_bench_model.py "$dir/"
  du -sh "$dir"
}

run() {
  local bin out
  bin="$(cd "$1" && pwd)"
  out="$2"
  if [ -f "$bin/bins.tar.xz" ]; then
    local unpacked="${TMPDIR:-/tmp}/m2unet_gpu_check_bin"
    rm -rf "$unpacked" && mkdir -p "$unpacked" &&
      tar -xJf "$bin/bins.tar.xz" -C "$unpacked" &&
      cp "$bin/gpu_check.sh" "$bin/torch_bench_model.py" "$unpacked/" ||
      { echo "cannot unpack $bin/bins.tar.xz" >&2; return 1; }
    bin="$unpacked"
  fi
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"
  local log="$out/log.txt"
  : >"$log"
  say() { echo "$@" | tee -a "$log"; }
  # Steps (all by default; a comma list as the third argument runs some): ops (op table, with
  # the wgmma probe), perf (CUDA engine timings), torch (PyTorch forward), autotune
  # (torch.compile max-autotune), train (PyTorch AMP step), tests (the other test binaries),
  # assess (512×512×300), bench (criterion). The table is rewritten after each group, so a
  # run stopped by its time limit still leaves one.
  local steps="${3:-ops,perf,torch,autotune,train,tests,assess,bench}"
  want() { [[ ",$steps," == *",$1,"* ]]; }
  make_table() {
  say "== table"
  python3 - "$out" <<'PY' >"$out/table.md"
import json, re, sys
out = sys.argv[1]
exists = lambda name: __import__("os").path.exists(f"{out}/{name}")
lines = lambda name: open(f"{out}/{name}").readlines() if exists(name) else []
t = json.load(open(f"{out}/torch.json")) if exists("torch.json") else {}
peak = t.get("peak_tflops")
rust = {}
convs = {}
for line in lines("perf_rust.txt"):
    m = re.match(r"PERF forward m=(\d+) ms=([\d.]+) gflop=([\d.]+)", line)
    if m:
        rust[int(m[1])] = (float(m[2]), float(m[3]))
    m = re.match(r"PERF conv (\S+) m=\d+ k=\d+ n=\d+ ms=([\d.]+) gflop=([\d.]+)", line)
    if m:
        convs[m[1]] = (float(m[2]), float(m[3]))
gpu = open(f"{out}/gpu_name.txt").read().strip()
drv = open(f"{out}/driver.txt").read().strip()
print(f"GPU {gpu}, driver {drv}, torch {t.get('torch', '?')}, measured fp16 peak {peak or float('nan'):.0f} TFLOP/s (8192³ matmul)\n")
def forward_ms(name):
    found = {}
    if __import__("os").path.exists(f"{out}/{name}"):
        for line in open(f"{out}/{name}"):
            m = re.match(r"PERF forward m=(\d+) ms=([\d.]+)", line)
            if m:
                found[int(m[1])] = float(m[2])
    return found
fused, mma = forward_ms("perf_fused.txt"), forward_ms("perf_mma.txt")
print("| eval forward, paper P=256 | m2unet ms | TFLOP/s | % peak | mma.sync tier ms | fused up_conv ms | torch eager ms | eager/m2unet | torch.compile ms | max-autotune ms | best compile/m2unet |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
f = lambda v, p=2: "—" if v is None else f"{v:.{p}f}"
for m, (ms, gflop) in sorted(rust.items()):
    tf = gflop / ms
    e = t.get("eager", {}).get(str(m))
    c = t.get("compile", {}).get(str(m))
    a = t.get("autotune", {}).get(str(m))
    best = min([v for v in (c, a) if v], default=None)
    print(f"| M={m} | {ms:.2f} | {tf:.1f} | {f(100 * tf / peak if peak else None, 1)} | {f(mma.get(m))} | {f(fused.get(m))} | {f(e)} | {f(e / ms if e else None)} | {f(c)} | {f(a)} | {f(best / ms if best else None)} |")
prof = {}
for line in lines("perf_rust.txt"):
    m = re.match(r"PROFILE m=(\d+) stage=(\S+) ms=([\d.]+)", line)
    if m:
        prof.setdefault(int(m[1]), []).append((m[2], float(m[3])))
if prof:
    ms_sizes = sorted(prof)
    print("\n| stage (eval forward) | " + " | ".join(f"M={m} ms" for m in ms_sizes) + " |")
    print("|---|" + "---|" * len(ms_sizes))
    for i, (stage, _) in enumerate(prof[ms_sizes[0]]):
        print(f"| {stage} | " + " | ".join(f"{prof[m][i][1]:.3f}" for m in ms_sizes) + " |")
train = {}
for line in lines("perf_rust.txt"):
    m = re.match(r"PERF train p=(\d+) m=(\d+) ms=([\d.]+) patches_per_s=([\d.]+) gflop=([\d.]+).* mem_gib=([\d.]+)", line)
    if m:
        train[f"p{m[1]}_m{m[2]}"] = (float(m[3]), float(m[5]), float(m[6]))
if train:
    print("\n| training step (fp16 mixed precision) | m2unet ms | patches/s | TFLOP/s | AMP eager ms | eager/m2unet | AMP compile ms | compile/m2unet | m2unet GiB | AMP peak GiB (eager) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, (ms, gflop, gib) in train.items():
        p, m = key[1:].split("_m")
        e = t.get("train_eager", {}).get(key)
        c = t.get("train_compile", {}).get(key)
        mem = t.get("train_mem_gib", {}).get(f"{key}_eager")
        print(f"| P={p}, M={m} | {ms:.2f} | {int(m) * 1e3 / ms:.0f} | {gflop / ms:.1f} | {f(e)} | {f(e / ms if e else None)} | {f(c)} | {f(c / ms if c else None)} | {gib:.1f} | {f(mem, 1)} |")
if __import__("os").path.exists(f"{out}/assess_timings.txt"):
    print("\n" + open(f"{out}/assess_timings.txt").read().strip() + " (512×512×300, paper-preset weights, P = 256, --device cuda)")
print("\n| conv3x3 (fp16, NHWC) @ tier | m2unet ms | TFLOP/s | % peak | torch/cuDNN ms | TFLOP/s | cuDNN/m2unet |")
print("|---|---|---|---|---|---|---|")
for name, (ms, gflop) in convs.items():
    c = t.get("conv", {}).get(name.split("@")[0])
    print(f"| {name} | {ms:.3f} | {gflop / ms:.1f} | {f(100 * gflop / ms / peak if peak else None, 1)} | {f(c, 3)} | {f(gflop / c if c else None, 1)} | {f(c / ms if c else None)} |")
PY
  tee -a "$log" <"$out/table.md"
  }
  say "== gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$log"
  nvidia-smi --query-gpu=name --format=csv,noheader | head -1 >"$out/gpu_name.txt"
  nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 >"$out/driver.txt"
  local status=0
  if want ops; then
  # The op table first: it holds the single-wgmma probe and the Hopper tier's rows. If they
  # fail or hang, everything after runs on the mma.sync tier (M2UNET_CONV_TIER=mma), so the
  # timings still come back.
  say "== ops_table on the GPU (M2UNET_TEST_DEVICE=cuda)"
  M2UNET_TEST_DEVICE=cuda timeout 90 "$bin/ops_table" --nocapture >"$out/ops_table.txt" 2>&1
  local rc=$?
  cat "$out/ops_table.txt" >>"$log"
  if [ $rc -eq 0 ]; then
    say "ops_table: passed"
  else
    say "ops_table: FAILED (exit $rc)"
    status=1
    if [ $rc -eq 124 ] || grep -q "wgmma.*FAIL" "$out/ops_table.txt"; then
      export M2UNET_CONV_TIER=mma
      say "the wgmma tier failed or hung: the rest of this run uses M2UNET_CONV_TIER=mma"
    fi
  fi
  fi
  if want perf; then
  say "== CUDA engine timings"
  timeout 120 "$bin/cuda_perf" --nocapture --test-threads 1 >"$out/perf_rust.txt" 2>&1 || { say "cuda_perf FAILED"; status=1; }
  cat "$out/perf_rust.txt" >>"$log"
  say "== the eval forward with the fused up_conv loader (the previous default)"
  M2UNET_UPCONV=fused M2UNET_PERF_PATCHES=32,128 timeout 60 "$bin/cuda_perf" gpu_forward_eval_paper_timing \
    --nocapture --test-threads 1 >"$out/perf_fused.txt" 2>&1 || say "fused up_conv timing stopped early"
  grep "^PERF forward" "$out/perf_fused.txt" | tee -a "$log"
  say "== the eval forward on the mma.sync tier only (the default on sm_90 is the wgmma tier)"
  M2UNET_CONV_TIER=mma M2UNET_PERF_PATCHES=32,128 timeout 60 "$bin/cuda_perf" gpu_forward_eval_paper_timing \
    --nocapture --test-threads 1 >"$out/perf_mma.txt" 2>&1 || say "mma.sync tier timing stopped early"
  grep "^PERF forward" "$out/perf_mma.txt" | tee -a "$log"
  fi
  if want torch; then
  say "== PyTorch timings"
  M2UNET_BIN="$bin" PYTHONUNBUFFERED=1 timeout 190 python3 - "$out" >>"$log" 2>&1 <<'PY' || say "PyTorch step stopped early (see log); the table uses what it measured"
import json, os, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, os.environ["M2UNET_BIN"])
from torch_bench_model import M2UNet, conv, timed

out = sys.argv[1]
res = {"torch": torch.__version__}
def save():
    json.dump(res, open(f"{out}/torch.json", "w"), indent=1)

dev = "cuda"
torch.backends.cudnn.benchmark = True

# Measured dense fp16 peak: 8192³ matmul.
x = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
y = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
ms = timed(lambda: x @ y, 20)
res["peak_tflops"] = 2 * 8192**3 / ms / 1e9
print(f"fp16 matmul 8192^3: {ms:.3f} ms, {res['peak_tflops']:.1f} TFLOP/s")
del x, y
save()

model = M2UNet().to(dev).eval().half().to(memory_format=torch.channels_last)
sizes = [8, 32, 128]
res["eager"], res["compile"], res["conv"] = {}, {}, {}
with torch.inference_mode():
    for m in sizes:
        xin = torch.rand(m, 1, 256, 256, device=dev, dtype=torch.float16).to(memory_format=torch.channels_last)
        res["eager"][m] = timed(lambda: model(xin), 5 if m == 128 else 10)
        print(f"torch eager fp16 channels_last M={m}: {res['eager'][m]:.3f} ms")
        save()
    # Single convolutions at the shapes of the Rust PERF conv lines.
    for name, n, h, cin, cout, pool in [("enc1.conv2", 8, 256, 64, 64, True),
                                        ("dec2.conv1", 8, 256, 128, 64, False),
                                        ("enc5.conv2", 128, 16, 512, 512, False)]:
        c = conv(cin, cout).to(dev).half().to(memory_format=torch.channels_last)
        xin = torch.rand(n, cin, h, h, device=dev, dtype=torch.float16).to(memory_format=torch.channels_last)
        if pool:
            res["conv"][name] = timed(lambda: F.max_pool2d(F.relu(c(xin)), 2), 20)
        else:
            res["conv"][name] = timed(lambda: F.relu(c(xin)), 20)
        print(f"torch conv {name}: {res['conv'][name]:.3f} ms")
    save()
    t0 = time.time()
    cmodel = torch.compile(model, dynamic=False)
    for m in sizes:
        xin = torch.rand(m, 1, 256, 256, device=dev, dtype=torch.float16).to(memory_format=torch.channels_last)
        res["compile"][m] = timed(lambda: cmodel(xin), 5 if m == 128 else 10)
        print(f"torch.compile M={m}: {res['compile'][m]:.3f} ms ({time.time() - t0:.0f} s since compile start)")
        save()
PY
  fi
  make_table
  if want autotune; then
  say "== torch.compile mode=max-autotune (last: its autotuning takes minutes)"
  M2UNET_BIN="$bin" PYTHONUNBUFFERED=1 timeout 150 python3 - "$out" >>"$log" 2>&1 <<'PY' || say "max-autotune stopped early; the table uses what it measured"
import json, os, sys, time
import torch
sys.path.insert(0, os.environ["M2UNET_BIN"])
from torch_bench_model import M2UNet, timed
out = sys.argv[1]
path = f"{out}/torch.json"
res = json.load(open(path)) if os.path.exists(path) else {}
res["autotune"] = {}
torch.backends.cudnn.benchmark = True
model = M2UNet().to("cuda").eval().half().to(memory_format=torch.channels_last)
t0 = time.time()
cmodel = torch.compile(model, mode="max-autotune", dynamic=False)
with torch.inference_mode():
    for m in [32, 128]:
        xin = torch.rand(m, 1, 256, 256, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        res["autotune"][m] = timed(lambda: cmodel(xin), 5 if m == 128 else 10)
        print(f"torch.compile max-autotune M={m}: {res['autotune'][m]:.3f} ms ({time.time() - t0:.0f} s)")
        json.dump(res, open(path, "w"), indent=1)
PY
  fi
  if want train; then
  say "== PyTorch AMP training step"
  M2UNET_BIN="$bin" PYTHONUNBUFFERED=1 timeout 200 python3 - "$out" >>"$log" 2>&1 <<'PY' || say "PyTorch training step stopped early (see log); the table uses what it measured"
import json, os, sys, time
import torch, torch.nn as nn, torch.nn.functional as F

out = sys.argv[1]
path = f"{out}/torch.json"
res = json.load(open(path)) if os.path.exists(path) else {}
res["train_eager"], res["train_compile"], res["train_mem_gib"] = {}, {}, {}
def save():
    json.dump(res, open(path, "w"), indent=1)
dev = "cuda"
torch.backends.cudnn.benchmark = True
sys.path.insert(0, os.environ["M2UNET_BIN"])
from torch_bench_model import M2UNet, timed

def losses(seg, cls, seg_y, cls_y):
    # docs/model.md: cls CE + (seg CE + soft Dice over the foreground classes, smoothing 1).
    ce = F.cross_entropy(seg.float(), seg_y)
    p = seg.float().softmax(1)
    y = F.one_hot(seg_y, 6).permute(0, 3, 1, 2).float()
    inter, den = (p * y).sum((0, 2, 3)), p.sum((0, 2, 3)) + y.sum((0, 2, 3))
    dice = 1 - ((2 * inter + 1) / (den + 1))[1:].mean()
    return F.cross_entropy(cls.float(), cls_y) + ce + dice

for p, m in [(256, 32), (112, 16)]:
    key = f"p{p}_m{m}"
    for mode in ["eager", "compile"]:
        torch.manual_seed(0)
        model = M2UNet().to(dev).train().to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, fused=True)
        scaler = torch.amp.GradScaler()
        fwd = torch.compile(model) if mode == "compile" else model
        x = torch.rand(m, 1, p, p, device=dev).to(memory_format=torch.channels_last)
        seg_y = torch.randint(0, 6, (m, p, p), device=dev)
        cls_y = torch.randint(0, 2, (m // 8,), device=dev)
        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16):
                seg, cls = fwd(x)
                loss = losses(seg, cls, seg_y, cls_y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        t0 = time.time()
        torch.cuda.reset_peak_memory_stats()
        ms = timed(step, 10, warmup=3)
        res[f"train_{mode}"][key] = ms
        res["train_mem_gib"][f"{key}_{mode}"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"torch AMP {mode} train step P={p} M={m}: {ms:.3f} ms ({m * 1e3 / ms:.1f} patches/s), "
              f"peak {res['train_mem_gib'][f'{key}_{mode}']:.1f} GiB, {time.time() - t0:.0f} s")
        save()
        del model, opt, fwd
        torch.cuda.empty_cache()
PY
  fi
  make_table
  if want tests; then
  for t in cuda_kernels cuda_forward cuda_train; do
    say "== $t on the GPU (M2UNET_TEST_DEVICE=cuda)"
    # The CLI tests need this checkout and the m2unet binary: CI runs them.
    if M2UNET_TEST_DEVICE=cuda timeout 150 "$bin/$t" --nocapture --test-threads 1 \
      --skip cli_ >>"$log" 2>&1; then
      say "$t: passed"
    else
      say "$t: FAILED"
      status=1
    fi
  done
  fi
  if want assess; then
  say "== assess of a 512×512×300 phantom on the GPU (paper-preset weights, P = 256)"
  if "$bin/m2unet" synth --out "$out/ct512" --count 1 --seed 7 --shape 512,512,300 >>"$log" 2>&1 &&
    "$bin/m2unet" init --out "$out/paper.safetensors" --preset paper --seed 1 >>"$log" 2>&1 &&
    timeout 100 "$bin/m2unet" assess "$out/ct512/case_0000.nii.gz" --weights "$out/paper.safetensors" \
      --device cuda --force --out "$out/assess" >>"$log" 2>&1; then
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("assess timings (ms):", json.dumps(r["timings_ms"]))' \
      "$out/assess/case_0000_report.json" | tee -a "$log" | tee "$out/assess_timings.txt"
  else
    say "assess on the GPU FAILED (see log)"
    status=1
  fi
  rm -rf "$out/ct512" "$out/paper.safetensors" "$out/assess"/*.nii.gz
  fi
  make_table
  if want bench; then
  say "== criterion benches"
  timeout 40 "$bin/cuda_kernels_bench" --bench >>"$log" 2>&1 || say "criterion benches stopped early"
  grep -E "^cuda_|time:|thrpt:" "$log" | tail -40 >"$out/criterion.txt"
  fi
  say "== done (status $status)"
  return $status
}

case "${1:-}" in
  collect) collect "${2:?BIN_DIR}" ;;
  run) run "${2:?BIN_DIR}" "${3:?OUT_DIR}" "${4:-}" ;;
  *) echo "usage: $0 collect BIN_DIR | run BIN_DIR OUT_DIR [STEPS]" >&2; exit 2 ;;
esac
