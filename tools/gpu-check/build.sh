#!/usr/bin/env bash
# Builds here what a lent GPU machine runs, and packs it into gpu-check/ (git-ignored): the
# test and tool binaries built for sm_90 (H100/H200), the non-system shared libraries they
# load (the GPU machine has CUDA's own libraries but none of Debian's), and the golden models.
# Then, on the GPU machine (the device tool's run, carrying gpu-check):
#   bash gpu-check/run.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SHARED=${MOED_SHARED_DIR:-$ROOT/../shared}
BUILD=$ROOT/build-gpu
OUT=$ROOT/gpu-check
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || { echo "gpu-check: needs nvcc" >&2; exit 1; }
export PATH=$PATH:/usr/local/cuda/bin

launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
mkdir -p "$BUILD"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOED_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DMOED_SHARED_DIR="$SHARED" "${launcher[@]}" >"$BUILD/configure.log" 2>&1 ||
  { cat "$BUILD/configure.log" >&2; exit 1; }
targets=(backend_ops_test kernels_backend_test conformance_golden_config_test moectl
         cache_expert_cache_test moed-bench-offload moed-synth moed-pack)
cmake --build "$BUILD" -j "$(nproc)" --target "${targets[@]}"

rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/lib" "$OUT/golden" "$OUT/golden-next"
binaries=("$BUILD/tests/backend_ops_test" "$BUILD/kernels/kernels_backend_test"
          "$BUILD/tests/conformance_golden_config_test" "$BUILD/client/moectl"
          "$BUILD/tools/cache_expert_cache_test" "$BUILD/tools/moed-bench-offload"
          "$BUILD/tools/moed-synth" "$BUILD/tools/moed-pack")
cp "${binaries[@]}" "$OUT/bin/"
strip --strip-debug "$OUT"/bin/*
# Libraries that are neither the C runtime nor CUDA's (both are on the GPU machine).
for binary in "${binaries[@]}"; do
  ldd "$binary" | awk '/=> \// {print $3}'
done | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|ld-linux*|libgcc_s.so*|libstdc++.so*) ;;
    libcuda.so*|libcudart.so*|libcublas.so*|libcublasLt.so*) ;;
    *) cp -L "$lib" "$OUT/lib/" ;;
  esac
done
strip --strip-unneeded "$OUT"/lib/* 2>/dev/null || true
for model in mixtral qwen2_moe qwen3_moe olmoe; do
  cp -r "$SHARED/golden/$model" "$OUT/golden/"
done
cp -r "$SHARED/golden-next/deepseek_v2" "$OUT/golden-next/"
cp "$ROOT/tools/gpu-check/run.sh" "$OUT/run.sh"
size=$(du -sm "$OUT" | cut -f1)
echo "gpu-check: $OUT holds ${size} MiB (the device tool carries at most 64 MiB)"
[ "$size" -lt 64 ] || { echo "gpu-check: too large to carry" >&2; exit 1; }
