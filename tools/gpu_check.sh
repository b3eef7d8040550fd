#!/usr/bin/env bash
# GPU check: runs the prebuilt CUDA test binaries on a real GPU (CUDA engine vs references),
# then times the eval forward of the paper preset (P=256; 8, 32, 128 patches) with CUDA events
# against PyTorch on the same GPU (fp16, channels_last, cudnn.benchmark; and torch.compile), and
# prints ms, TFLOP/s, % of the measured fp16 peak and the ratios as a table (≤ 10 minutes:
# every step has its own time limit).
#
# The GPU machine needs CUDA's driver, Python 3 with torch; no Rust. Two steps:
#   on a build machine (Rust, nvcc found by build.rs, e.g. tools/install_cuda_wheels.sh):
#     tools/gpu_check.sh collect BIN_DIR     # builds and copies the binaries + this script
#   on the GPU machine:
#     BIN_DIR/gpu_check.sh run BIN_DIR OUT_DIR   # ≤ 10 minutes; OUT_DIR gets log.txt, table.md
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
  for f in "$dir"/*; do
    [ -x "$f" ] && [ "${f##*.}" != sh ] && strip --strip-debug "$f" 2>/dev/null
  done
  cp tools/gpu_check.sh "$dir/"
  du -sh "$dir"
}

run() {
  local bin out
  bin="$(cd "$1" && pwd)"
  out="$2"
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"
  local log="$out/log.txt"
  : >"$log"
  say() { echo "$@" | tee -a "$log"; }
  say "== gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$log"
  nvidia-smi --query-gpu=name --format=csv,noheader | head -1 >"$out/gpu_name.txt"
  nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 >"$out/driver.txt"
  local status=0
  for t in cuda_kernels cuda_forward ops_table; do
    say "== $t on the GPU (M2UNET_TEST_DEVICE=cuda)"
    # The CLI-on-the-emulator test needs the source tree and the m2unet binary: CI runs it.
    if M2UNET_TEST_DEVICE=cuda timeout 90 "$bin/$t" --nocapture --test-threads 1 \
      --skip cli_forward_emu_matches_pytorch_fixtures >>"$log" 2>&1; then
      say "$t: passed"
    else
      say "$t: FAILED"
      status=1
    fi
  done
  say "== CUDA engine timings"
  timeout 90 "$bin/cuda_perf" --nocapture --test-threads 1 >"$out/perf_rust.txt" 2>&1 || { say "cuda_perf FAILED"; status=1; }
  cat "$out/perf_rust.txt" >>"$log"
  say "== PyTorch timings"
  PYTHONUNBUFFERED=1 timeout 190 python3 - "$out" >>"$log" 2>&1 <<'PY' || say "PyTorch step stopped early (see log); the table uses what it measured"
import json, sys, time
import torch, torch.nn as nn, torch.nn.functional as F

out = sys.argv[1]
res = {"torch": torch.__version__}
def save():
    json.dump(res, open(f"{out}/torch.json", "w"), indent=1)

dev = "cuda"
torch.backends.cudnn.benchmark = True

def timed(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters

# Measured dense fp16 peak: 8192³ matmul.
x = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
y = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
ms = timed(lambda: x @ y, 20)
res["peak_tflops"] = 2 * 8192**3 / ms / 1e9
print(f"fp16 matmul 8192^3: {ms:.3f} ms, {res['peak_tflops']:.1f} TFLOP/s")
del x, y
save()

def conv(i, o):
    return nn.Conv2d(i, o, 3, padding=1)

class Enc(nn.Module):
    def __init__(s, i, o):
        super().__init__()
        s.conv1, s.bn1, s.conv2, s.bn2 = conv(i, o), nn.BatchNorm2d(o), conv(o, o), nn.BatchNorm2d(o)
    def forward(s, x):
        return F.relu(s.bn2(s.conv2(F.relu(s.bn1(s.conv1(x))))))

class Dec(nn.Module):
    def __init__(s, i, w):
        super().__init__()
        s.up_conv, s.up_bn = conv(i, w), nn.BatchNorm2d(w)
        s.conv1, s.bn1, s.conv2, s.bn2 = conv(2 * w, w), nn.BatchNorm2d(w), conv(w, w), nn.BatchNorm2d(w)
    def forward(s, x, skip):
        u = F.relu(s.up_bn(s.up_conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))))
        c = torch.cat([u, skip], 1)
        return F.relu(s.bn2(s.conv2(F.relu(s.bn1(s.conv1(c))))))

class M2UNet(nn.Module):
    # docs/model.md, paper preset; bags of 8 patches, GCP = max - mean.
    def __init__(s, W=64, B=512, K1=256, K2=128):
        super().__init__()
        s.enc = nn.ModuleList([Enc(1, W), Enc(W, W), Enc(W, W), Enc(W, W), Enc(W, B)])
        s.dec = nn.ModuleList([Dec(B, W), Dec(W, W), Dec(W, W), Dec(W, W)])
        s.seg_head = nn.Conv2d(W, 6, 1)
        s.emb_concepts, s.emb_proj, s.emb_bn = nn.Linear(B, K1), nn.Linear(K1, K1), nn.BatchNorm1d(K1)
        s.img_concepts, s.img_proj, s.classifier = nn.Linear(K1, K2), nn.Linear(K2, K2), nn.Linear(K2, 2)
    def forward(s, x):
        skips = []
        for i, e in enumerate(s.enc):
            x = e(x)
            if i < 4:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        h = x
        for d in s.dec:
            x = d(x, skips.pop())
        seg = s.seg_head(x)
        sc = s.emb_concepts(h.flatten(2).transpose(1, 2))
        z = sc.amax(1) - sc.mean(1)
        e = F.relu(s.emb_bn(s.emb_proj(z)))
        t = s.img_concepts(e).view(-1, 8, s.img_concepts.out_features)
        g = t.amax(1) - t.mean(1)
        return seg, s.classifier(F.relu(s.img_proj(g)))

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
    for name, n, h, cin, cout in [("dec2.conv1", 8, 256, 128, 64), ("enc5.conv2", 128, 16, 512, 512)]:
        c = conv(cin, cout).to(dev).half().to(memory_format=torch.channels_last)
        xin = torch.rand(n, cin, h, h, device=dev, dtype=torch.float16).to(memory_format=torch.channels_last)
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
  say "== table"
  python3 - "$out" <<'PY' >"$out/table.md"
import json, re, sys
out = sys.argv[1]
t = json.load(open(f"{out}/torch.json")) if __import__("os").path.exists(f"{out}/torch.json") else {}
peak = t.get("peak_tflops")
rust = {}
convs = {}
for line in open(f"{out}/perf_rust.txt"):
    m = re.match(r"PERF forward m=(\d+) ms=([\d.]+) gflop=([\d.]+)", line)
    if m:
        rust[int(m[1])] = (float(m[2]), float(m[3]))
    m = re.match(r"PERF conv (\S+) m=\d+ k=\d+ n=\d+ ms=([\d.]+) gflop=([\d.]+)", line)
    if m:
        convs[m[1]] = (float(m[2]), float(m[3]))
gpu = open(f"{out}/gpu_name.txt").read().strip()
drv = open(f"{out}/driver.txt").read().strip()
print(f"GPU {gpu}, driver {drv}, torch {t.get('torch', '?')}, measured fp16 peak {peak or float('nan'):.0f} TFLOP/s (8192³ matmul)\n")
print("| eval forward, paper P=256 | m2unet ms | TFLOP/s | % peak | torch eager ms | eager/m2unet | torch.compile ms | compile/m2unet |")
print("|---|---|---|---|---|---|---|---|")
f = lambda v, p=2: "—" if v is None else f"{v:.{p}f}"
for m, (ms, gflop) in sorted(rust.items()):
    tf = gflop / ms
    e = t.get("eager", {}).get(str(m))
    c = t.get("compile", {}).get(str(m))
    print(f"| M={m} | {ms:.2f} | {tf:.1f} | {f(100 * tf / peak if peak else None, 1)} | {f(e)} | {f(e / ms if e else None)} | {f(c)} | {f(c / ms if c else None)} |")
prof = {}
for line in open(f"{out}/perf_rust.txt"):
    m = re.match(r"PROFILE m=(\d+) stage=(\S+) ms=([\d.]+)", line)
    if m:
        prof.setdefault(int(m[1]), []).append((m[2], float(m[3])))
if prof:
    ms_sizes = sorted(prof)
    print("\n| stage (eval forward) | " + " | ".join(f"M={m} ms" for m in ms_sizes) + " |")
    print("|---|" + "---|" * len(ms_sizes))
    for i, (stage, _) in enumerate(prof[ms_sizes[0]]):
        print(f"| {stage} | " + " | ".join(f"{prof[m][i][1]:.3f}" for m in ms_sizes) + " |")
print("\n| conv3x3 (fp16, NHWC) | m2unet ms | TFLOP/s | torch/cuDNN ms | TFLOP/s | cuDNN/m2unet |")
print("|---|---|---|---|---|---|")
for name, (ms, gflop) in convs.items():
    c = t.get("conv", {}).get(name)
    print(f"| {name} | {ms:.3f} | {gflop / ms:.1f} | {f(c, 3)} | {f(gflop / c if c else None, 1)} | {f(c / ms if c else None)} |")
PY
  tee -a "$log" <"$out/table.md"
  say "== criterion benches"
  timeout 40 "$bin/cuda_kernels_bench" --bench >>"$log" 2>&1 || say "criterion benches stopped early"
  grep -E "^cuda_|time:|thrpt:" "$log" | tail -40 >"$out/criterion.txt"
  say "== done (status $status)"
  return $status
}

case "${1:-}" in
  collect) collect "${2:?BIN_DIR}" ;;
  run) run "${2:?BIN_DIR}" "${3:?OUT_DIR}" ;;
  *) echo "usage: $0 collect BIN_DIR | run BIN_DIR OUT_DIR" >&2; exit 2 ;;
esac
