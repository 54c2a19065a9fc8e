#!/usr/bin/env bash
# GPU check: build for the machine's GPU with its own torch, run the CUDA tests and the CUDA
# benchmarks (attention with the tensor-core backward and with the default one, batch norm,
# optimizers, clipping), and compare the Adam step and batch norm with the device's copy bandwidth.
# Meant to finish within 9 minutes, build included (the timeouts bound each step). Writes its
# report to ${OUT:-gpu_check_out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== build"
CAP=$(python -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())")
case "$CAP" in avx512|avx2) ISAS="$CAP" ;; *) ISAS=default ;; esac
time TORCHFAST_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" TORCHFAST_CPU_ISAS="$ISAS" \
  MAX_JOBS="${MAX_JOBS:-16}" pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
grep "torchfast build" "$OUT/build.log" || true
(cd / && torchfast info)

echo "== CUDA tests"
TORCHFAST_REQUIRE_KERNELS=1 timeout 120 pytest tests -q -k cuda -p no:cacheprovider --junitxml="$OUT/tests.xml" \
  || echo "CUDA TESTS FAILED"

echo "== CUDA attention (bf16, D=64 and 128; GFLOP/s beside torch SDPA), tensor-core backward on"
(cd / && TORCHFAST_ATTENTION_WMMA_BACKWARD=1 timeout 120 torchfast bench --device cuda --rounds 12 \
  --suites attention --attn-head-dims 64 128 --json "$OUT/bench_attention.json") | tee "$OUT/bench_attention.md" \
  || echo "ATTENTION BENCH FAILED"
echo "== CUDA benchmarks (batch norm: bf16 channels_last (128, 64, 56, 56); optimizers; clipping)"
# --report: RESULTS.md with a "GPU figures" section and the plots, ready for benchmarks/report-gpu/
(cd / && timeout 90 torchfast bench --device cuda --rounds 20 --suites norm optim clip --no-compile \
  --json "$OUT/bench_cuda.json" --report "$OUT/report-gpu") | tee "$OUT/bench_cuda.md" || echo "CUDA BENCH FAILED"
echo "== attention at L=4096 with the default (scalar) backward, for comparison"
(cd / && timeout 40 torchfast bench --device cuda --rounds 6 --suites attention \
  --attn-lengths 4096 --attn-memory-lengths 4096) | tee "$OUT/bench_attention_scalar_bwd.md" || true

echo "== device copy bandwidth vs Adam and batch norm"
[ -f "$OUT/bench_cuda.json" ] || exit 0
python - "$OUT/bench_cuda.json" <<'PY'
import json, sys, torch
x = torch.empty(256 * 2**20, device="cuda")  # 1 GiB
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(20):
    start.record(); y.copy_(x); end.record(); end.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
times.sort()
copy_gbs = 2 * x.numel() * 4 / times[len(times) // 2] / 1e9
print(f"device copy: {copy_gbs:.0f} GB/s (read + write, median of 20)")
report = json.load(open(sys.argv[1]))
for r in report.get("optim", []):
    if r["impl"] == "torchfast":
        print(f"{r['optimizer']:>12} {r['case']:>10}: {r['GB/s']:.0f} GB/s = {100 * r['GB/s'] / copy_gbs:.0f}% of copy")
for r in report.get("clip", []):
    print(f"{r['bench']:>32} {r['impl']:>36}: {r['median_ms']:.3f} ms, ratio vs torch {r['ratio']:.2f}")
for r in report.get("norm", []):
    if r["bench"].startswith("BN"):  # target: the fused kernels >= 70% of copy
        print(f"{r['bench']:>36} {r['impl']:>10}: {r['GB/s']:.0f} GB/s = {100 * r['GB/s'] / copy_gbs:.0f}% of copy")
PY
