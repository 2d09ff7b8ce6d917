#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with gpu-check/ carried there: the
# operator table on the CUDA device, the backend tests, the golden logits on the device,
# moectl logits --backend cuda beside --backend cpu, the expert cache's device tier on the GPU
# (exact mode at 25 and 50 % budgets bitwise equal to all-resident on the GPU, and the
# ordering tests), compute-sanitizer where the machine allows it, and the offload benchmark
# over PCIe. Under 8 minutes; the log lands in $OUT/gpu-check.log when $OUT is set.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
LOG=${OUT:-/tmp}/gpu-check.log
cuda_libs=""
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$dir" ] && cuda_libs="$cuda_libs:$dir"
done
# CUDA's pip wheels, where the toolkit's own directory lacks cuBLAS.
for dir in $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p)))' 2>/dev/null); do
  [ -d "$dir" ] && cuda_libs="$cuda_libs:$dir"
done
export LD_LIBRARY_PATH="$HERE/lib$cuda_libs:${LD_LIBRARY_PATH:-}"
mkdir -p /tmp/moed-shared && rm -rf /tmp/moed-shared/golden /tmp/moed-shared/golden-next &&
  cp -r "$HERE/golden" "$HERE/golden-next" /tmp/moed-shared/
export MOED_SHARED_DIR=/tmp/moed-shared
status=0
step() {
  echo "=== $*" | tee -a "$LOG"
  timeout 150 "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== exit $rc" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}
: >"$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
step "$HERE/bin/kernels_backend_test" -s -r compact
step "$HERE/bin/backend_ops_test" -r compact
step "$HERE/bin/conformance_golden_config_test" "golden*" -r compact
tokens=1,15,27,300,42,7,99,3
for path in golden/mixtral golden/qwen2_moe golden/qwen3_moe golden/olmoe golden-next/deepseek_v2; do
  model=$(basename "$path")
  for backend in cpu cuda; do
    echo "=== moectl logits --model $model --backend $backend" | tee -a "$LOG"
    timeout 60 "$HERE/bin/moectl" logits --model "$HERE/$path" --tokens "$tokens" \
      --greedy 4 --backend "$backend" >"/tmp/logits-$model-$backend.json" 2>>"$LOG" || status=1
  done
  python3 - "$model" >>"$LOG" 2>&1 <<'PY' || status=1
import json, sys
m = sys.argv[1]
cpu, cuda = (json.load(open(f"/tmp/logits-{m}-{b}.json")) for b in ("cpu", "cuda"))
rows = lambda r: r["prompt_logits"] + r["greedy_logits"]
diff = max(abs(a - b) for ra, rb in zip(rows(cpu), rows(cuda)) for a, b in zip(ra, rb))
same = cpu["greedy"] == cuda["greedy"]
print(f"{m}: greedy cpu {cpu['greedy']} cuda {cuda['greedy']} ({'same' if same else 'DIFFERENT'}), "
      f"max |logit cpu - cuda| {diff:.3g}")
sys.exit(0 if same and diff <= 1e-4 else 1)
PY
  tail -1 "$LOG"
done
# The device tier in GPU memory: the overlap tests run a CUDA row beside the stand-in's.
step "$HERE/bin/cache_expert_cache_test" "*overlap*" -r compact
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$sanitizer" ]; then
  step "$sanitizer" --tool memcheck --error-exitcode 1 "$HERE/bin/kernels_backend_test" -r compact
  step "$sanitizer" --tool memcheck --error-exitcode 1 "$HERE/bin/cache_expert_cache_test" \
    "overlap: compute waits*" -r compact
  step "$sanitizer" --tool racecheck --error-exitcode 1 "$HERE/bin/kernels_backend_test" -r compact
else
  echo "=== compute-sanitizer: not on this machine" | tee -a "$LOG"
fi
# Offload over PCIe: a Mixtral-shaped model (bench-1g) whose experts are twice the device budget
# at 50 %, every expert in pinned RAM, against all-resident on this GPU and the roofline.
bench=/tmp/moed-bench
rm -rf "$bench" && mkdir -p "$bench"
if timeout 120 "$HERE/bin/moed-synth" --preset bench-1g --out "$bench/bench-1g" >>"$LOG" 2>&1 &&
   timeout 120 "$HERE/bin/moed-pack" --model "$bench/bench-1g" --out "$bench/bench-1g-store" \
     --precisions source,int4 >>"$LOG" 2>&1; then
  step "$HERE/bin/moed-bench-offload" --backend cuda --store "$bench/bench-1g-store" \
    --host-cache 1 --budgets 1,0.5,0.25 --prefetch off --skip-staging --seconds 3 --steps 32 \
    --predict-steps 0
else
  echo "=== bench model: synthesis or packing failed" | tee -a "$LOG"
  status=1
fi
echo "gpu-check: $([ $status -eq 0 ] && echo passed || echo FAILED)" | tee -a "$LOG"
exit $status
