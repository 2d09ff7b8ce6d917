#!/usr/bin/env bash
# moed's one entry point for users and CI.
#
#   ./dev.sh run [moed flags...]   install what is missing, build, create the demo model, start moed
#   ./dev.sh test                   the same set-up, then every test through ctest
#   ./dev.sh test --sanitize address|thread   the suite under ASan+UBSan or TSan (own build dir)
#   ./dev.sh test --slow            TSan suite and long fuzzing (run before resolving concurrency
#                                   or parser work)
#   ./dev.sh test --deploy          the deployment checks: compose, kustomize overlays against their
#                                   schemas, and the container image built with podman and run
#   ./dev.sh build | deps           just build, or just install the Debian packages
#   ./dev.sh image PREFIX           (inside the image build) the daemon and tools into PREFIX/bin
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$(pwd)

# The Debian packages that build moed (the container image's build stage installs only these).
BUILD_PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto
  libabsl-dev liburing-dev nlohmann-json3-dev catch2 libcpp-httplib-dev libspdlog-dev libfmt-dev
  libcli11-dev libxxhash-dev libpcre2-dev libutf8proc-dev libbenchmark-dev libboost-dev
)
# Every Debian package the build, the tests and their peers need; a new machine has none.
PACKAGES=(
  "${BUILD_PACKAGES[@]}" ccache
  clang libclang-rt-14-dev
  python3 python3-grpcio python3-protobuf python3-prometheus-client python3-numpy fio prometheus
)
# What ./dev.sh test --deploy adds: the image build and the manifests' checkers.
DEPLOY_PACKAGES=(podman debootstrap docker-compose uidmap fuse-overlayfs)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# install_deps [PACKAGE...]: those named (default: PACKAGES, with Node.js and npm).
install_deps() {
  local missing=() wanted=("$@")
  [ ${#wanted[@]} -eq 0 ] && wanted=("${PACKAGES[@]}")
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  # Node.js and npm run the OpenAI SDK test; a machine that has them from elsewhere keeps them.
  [ $# -eq 0 ] && { command -v npm >/dev/null || missing+=(nodejs npm); }
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${#missing[@]} Debian packages: ${missing[*]}"
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "dev.sh: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    sudo=(sudo)
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

shared_dir() { echo "${MOED_SHARED_DIR:-$ROOT/../shared}"; }

# configure_and_build DIR [cmake args...]
configure_and_build() {
  local dir=$1; shift
  local launcher=()
  command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
  say "configuring $dir"
  mkdir -p "$dir"
  cmake -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DMOED_SHARED_DIR="$(shared_dir)" "${launcher[@]}" "$@" >"$dir/configure.log" 2>&1 ||
    { cat "$dir/configure.log" >&2; exit 1; }
  say "building $dir"
  cmake --build "$dir" -j "$(nproc)" >&2  # stdout stays for what the commands print
}

run_ctest() {
  local dir=$1; shift
  say "testing $dir"
  (cd "$dir" && ctest -j "$(nproc)" --output-on-failure --timeout 600 "$@")
}

cmd_run() {
  install_deps
  configure_and_build "$ROOT/build"
  if [ ! -f "$ROOT/models/demo/config.json" ]; then
    say "creating the demo model in models/demo"
    "$ROOT/build/tools/moed-synth" --arch mixtral --preset demo --out "$ROOT/models/demo" >&2
  fi
  cat >&2 <<MSG

moed is starting on the demo model (a tiny Mixtral-shaped MoE with random weights).
In another terminal:
  build/client/moectl health
  build/client/moectl info
Stop it with Ctrl-C.

MSG
  exec "$ROOT/build/server/moed" --model "$ROOT/models/demo" "$@"
}

# The official OpenAI SDK, pinned in tests/openai/package-lock.json, for the HTTP API's test.
install_test_clients() {
  if [ ! -f "$ROOT/tests/openai/node_modules/openai/package.json" ]; then
    say "installing the OpenAI SDK for the HTTP API test (npm ci)"
    (cd "$ROOT/tests/openai" && npm ci --no-audit --no-fund --loglevel=error) >&2
  fi
}

# The release binaries for the container image, without tests, and the Debian packages whose
# libraries they load (read from the binaries, so the runtime stage never drifts from the build).
cmd_image() {
  local prefix=${1:?usage: dev.sh image PREFIX}
  install_deps "${BUILD_PACKAGES[@]}"
  # With nvcc (deploy/Dockerfile.cuda's build stage) the CUDA backend is built in.
  local cuda=OFF
  if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
    cuda=ON
    export PATH=$PATH:/usr/local/cuda/bin
  fi
  configure_and_build "$ROOT/build-image" -DCMAKE_BUILD_TYPE=Release -DMOED_TESTS=OFF -DMOED_CUDA=$cuda
  mkdir -p "$prefix/bin"
  local binaries=(server/moed client/moectl tools/moed-pack tools/moed-synth)
  for b in "${binaries[@]}"; do install -m 0755 "$ROOT/build-image/$b" "$prefix/bin/"; done
  strip --strip-unneeded "$prefix"/bin/*
  local lib candidate owner
  for lib in $(ldd "$prefix"/bin/* | awk '/=> \// { print $3 }' | sort -u); do
    # dpkg knows a file by the path its package installed, which usrmerge may have moved.
    owner=""
    for candidate in "$lib" "$(realpath "$lib")" "${lib#/usr}" "/usr$lib"; do
      owner=$(dpkg -S "$candidate" 2>/dev/null | head -1 | cut -d: -f1) && [ -n "$owner" ] && break
    done
    [ -n "$owner" ] || { echo "dev.sh image: no Debian package owns $lib" >&2; exit 1; }
    echo "$owner"
  done | sort -u >"$prefix/runtime-packages.txt"
  say "runtime packages: $(tr '\n' ' ' <"$prefix/runtime-packages.txt")"
}

# Deployment checks: compose and Prometheus configuration, the Kubernetes overlays rendered and
# validated offline, and the image built for real with podman and run from its mounted root.
cmd_test_deploy() {
  install_deps "${PACKAGES[@]}" "${DEPLOY_PACKAGES[@]}"
  command -v kubectl >/dev/null ||
    { echo "dev.sh test --deploy: needs kubectl (with kustomize), which Debian 12 does not package" >&2; exit 1; }
  if [ ! -f "$ROOT/tests/deploy/node_modules/kubernetes-models/package.json" ]; then
    say "installing the Kubernetes schema packages (npm ci)"
    (cd "$ROOT/tests/deploy" && npm ci --no-audit --no-fund --loglevel=error) >&2
  fi
  configure_and_build "$ROOT/build"
  say "checking the deployment files"
  "$ROOT/tests/deploy/manifests_test.sh"
  say "building and running the container image"
  "$ROOT/tests/deploy/image_test.sh"
}

cmd_test() {
  local sanitize="" slow=0
  while [ $# -gt 0 ]; do
    case $1 in
      --sanitize) sanitize=$2; shift 2 ;;
      --sanitize=*) sanitize=${1#*=}; shift ;;
      --slow) slow=1; shift ;;
      --deploy) cmd_test_deploy; return ;;
      *) echo "dev.sh test: unknown option $1" >&2; exit 2 ;;
    esac
  done
  install_deps
  install_test_clients
  local shared; shared=$(shared_dir)
  local ctest_filter=() conformance_note=""
  if [ ! -d "$shared/golden" ]; then
    ctest_filter=(-LE conformance)
    conformance_note="the conformance tier did not run: no conformance data at $shared (it holds golden/ and tokenizers/; set MOED_SHARED_DIR to its path)"
  fi
  export TSAN_OPTIONS="suppressions=$ROOT/tests/tsan.supp ${TSAN_OPTIONS:-}"
  export UBSAN_OPTIONS="print_stacktrace=1 halt_on_error=1 ${UBSAN_OPTIONS:-}"

  if [ $slow -eq 1 ]; then
    configure_and_build "$ROOT/build-tsan" -DMOED_SANITIZE=thread -DMOED_CUDA=OFF
    run_ctest "$ROOT/build-tsan" "${ctest_filter[@]}"
    CC=clang CXX=clang++ configure_and_build "$ROOT/build-fuzz" -DMOED_FUZZ=ON -DMOED_FUZZ_SECONDS=300
    run_ctest "$ROOT/build-fuzz"
  elif [ -n "$sanitize" ]; then
    case $sanitize in address|thread) ;; *) echo "dev.sh: --sanitize address or thread" >&2; exit 2 ;; esac
    local dir="$ROOT/build-$sanitize"
    configure_and_build "$dir" -DMOED_SANITIZE="$sanitize" -DMOED_CUDA=OFF
    run_ctest "$dir" "${ctest_filter[@]}"
  else
    configure_and_build "$ROOT/build"
    CC=clang CXX=clang++ configure_and_build "$ROOT/build-fuzz" -DMOED_FUZZ=ON -DMOED_FUZZ_SECONDS=15
    run_ctest "$ROOT/build-fuzz"
    run_ctest "$ROOT/build" "${ctest_filter[@]}"
  fi
  if [ -n "$conformance_note" ]; then
    echo
    echo "NOTE: $conformance_note"
  fi
}

case ${1:-} in
  run) shift; cmd_run "$@" ;;
  test) shift; cmd_test "$@" ;;
  build) install_deps; configure_and_build "$ROOT/build" ;;
  deps) install_deps ;;
  image) shift; cmd_image "$@" ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
