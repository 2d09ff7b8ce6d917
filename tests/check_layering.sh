#!/bin/sh
# The Backend seam holds: no file of model/, cache/, scheduler/ or server/ includes a CPU or
# CUDA backend header or names the CPU kernels' namespace, and (from the configure step's
# layering.txt) the libraries of model/, cache/ and scheduler/ link no backend implementation.
set -eu
root=$1
build=$2
status=0
hits=$(grep -rnE '#include "kernels/(cpu_ops|cpu_backend|thread_pool|matmul_block)|#include "kernels/cuda/|\bcpu::' \
  "$root/model" "$root/cache" "$root/scheduler" "$root/server" || true)
if [ -n "$hits" ]; then
  echo "these files reach past the Backend seam:" >&2
  echo "$hits" >&2
  status=1
fi
for library in moed_model moed_cache moed_scheduler; do
  line=$(grep "^$library:" "$build/layering.txt") || { echo "$library missing from layering.txt" >&2; exit 1; }
  case " $line " in
    *" moed_kernels "*) ;;
    *) echo "$library does not link moed_kernels: the check below would be vacuous" >&2; status=1 ;;
  esac
  for forbidden in moed_kernels_cpu moed_kernels_cuda moed_kernels_grid moed_backends; do
    case " $line " in
      *" $forbidden "*) echo "$library links $forbidden" >&2; status=1 ;;
    esac
  done
done
[ $status -eq 0 ] && echo "model/, cache/, scheduler/ and server/ compute only through kernels/backend.h"
exit $status
