#!/usr/bin/env bash
# Builds deploy/Dockerfile for real with podman, then runs moed from the image's root on a demo
# model and talks to it from outside (./dev.sh test --deploy). No registry is reachable, so the
# base images are made here with debootstrap and imported under the names the Dockerfile uses.
# Running containers does not work on every machine; the image's root is mounted and entered with
# chroot instead, which runs exactly the image's files.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${MOED_DEPLOY_WORK:-$ROOT/build-deploy}
IMAGE=localhost/moed:test
mkdir -p "$WORK"
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
[ "$(id -u)" -eq 0 ] || { echo "image_test.sh: needs root (debootstrap, chroot, mounts)" >&2; exit 1; }

# Removes a directory this script made, never crossing into a mount (debootstrap mounts /proc
# and /sys inside its target while it runs).
safe_rm() {
  if awk -v dir="$1/" 'index($2 "/", dir) == 1' /proc/self/mounts | grep -q .; then
    echo "image_test.sh: something is mounted below $1; not removing it" >&2
    exit 1
  fi
  rm -rf --one-file-system "$1"
}

# Debian 12 minbase as debian:12, and the same with documentation and locales stripped as
# debian:12-slim (what Docker's slim image drops), each kept as a tarball between runs.
make_base() {
  local tarball=$WORK/debian-12-minbase.tar
  if [ ! -f "$tarball" ]; then
    say "debootstrap: Debian 12 minbase"
    safe_rm "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
      { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    tar -C "$WORK/rootfs" -cf "$tarball.partial" . && mv "$tarball.partial" "$tarball"
    safe_rm "$WORK/rootfs"
  fi
  if [ ! -f "$WORK/debian-12-slim.tar" ]; then
    safe_rm "$WORK/slim" && mkdir -p "$WORK/slim" && tar -C "$WORK/slim" -xf "$tarball"
    mkdir -p "$WORK/slim/etc/dpkg/dpkg.cfg.d"
    cat >"$WORK/slim/etc/dpkg/dpkg.cfg.d/slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
    find "$WORK/slim/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$WORK/slim/usr/share/man/"* "$WORK/slim/usr/share/info/"* "$WORK/slim/var/cache/apt/"*.bin
    find "$WORK/slim/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    rm -rf "$WORK/slim/var/lib/apt/lists/"*
    tar -C "$WORK/slim" -cf "$WORK/debian-12-slim.tar" . && safe_rm "$WORK/slim"
  fi
  podman image exists localhost/debian:12 || podman import -q "$tarball" localhost/debian:12 >/dev/null
  podman image exists localhost/debian:12-slim ||
    podman import -q "$WORK/debian-12-slim.tar" localhost/debian:12-slim >/dev/null
}

make_base
say "podman build -f deploy/Dockerfile (chroot isolation)"
start=$(date +%s)
podman build --isolation=chroot --format docker --pull=never -f "$ROOT/deploy/Dockerfile" -t "$IMAGE" "$ROOT" \
  >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; exit 1; }
build_seconds=$(( $(date +%s) - start ))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect --format '{{.Size}}' localhost/debian:12-slim)
say "image built in ${build_seconds}s: $((size / 1048576)) MiB (the slim base: $((base_size / 1048576)) MiB)"

# What the image declares.
config=$(podman image inspect --format '{{json .Config}}' "$IMAGE")
/usr/bin/python3 - "$config" <<'PY'
import json, sys
c = json.loads(sys.argv[1])
assert c["User"] == "moed", c["User"]
assert set(c["ExposedPorts"]) == {"50051/tcp", "8000/tcp"}, c["ExposedPorts"]
assert c["Entrypoint"] == ["moed"], c["Entrypoint"]
assert "/models" in c["Volumes"], c["Volumes"]
env = dict(e.split("=", 1) for e in c["Env"])
assert env["MOED_HTTP_LISTEN"] == "0.0.0.0:8000" and env["MOED_LISTEN"] == "0.0.0.0:50051", env
print("image config: user moed, ports 50051 and 8000, volume /models, entrypoint moed")
PY
healthcheck=$(podman image inspect --format '{{json .HealthCheck}}' "$IMAGE")
case $healthcheck in *moectl*health*) ;; *) echo "no moectl HEALTHCHECK: $healthcheck" >&2; exit 1 ;; esac

# Run it from the image's own root (read-only, as podman mounts it). Each run happens in a
# private mount namespace: /proc, a minimal /dev and the models directory are mounted there
# only, so they vanish with the process and nothing on the host is bound into the image.
mounted=$(podman image mount "$IMAGE" | tail -1)
[ -x "$mounted/opt/moed/bin/moed" ] || { echo "the mounted image has no /opt/moed/bin/moed: $mounted" >&2; exit 1; }
models=$WORK/models
safe_rm "$models" && mkdir -p "$models" && chown 10001:10001 "$models"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  podman image unmount "$IMAGE" >/dev/null 2>&1 || true
}
trap 'status=$?; cleanup; exit $status' EXIT
in_image() {
  exec unshare --mount --propagation private -- bash -euc '
    root=$1 models=$2; shift 2
    mount -t proc proc "$root/proc"
    mount -t tmpfs -o mode=755,size=1m tmpfs "$root/dev"
    for node in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0"; do
      read -r name major minor <<<"$node"
      mknod -m 666 "$root/dev/$name" c "$major" "$minor"
    done
    ln -s /proc/self/fd "$root/dev/fd"
    mount --bind "$models" "$root/models"
    exec chroot --userspec=10001:10001 "$root" /usr/bin/env -i HOME=/var/lib/moed \
      PATH=/opt/moed/bin:/usr/bin:/bin "$@"' in_image "$mounted" "$models" "$@"
}

(in_image moed-synth --arch mixtral --preset demo --out /models/demo >/dev/null)
(in_image moed --version)
in_image moed --model /models/demo --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --log-format json \
  >"$WORK/moed.out" 2>"$WORK/moed.err" &
pid=$!
for _ in $(seq 600); do [ "$(wc -l <"$WORK/moed.out")" -ge 2 ] && break; sleep 0.1; done
grpc=$(sed -n 's/^listening on //p' "$WORK/moed.out")
http=$(sed -n 's/^http listening on //p' "$WORK/moed.out")
[ -n "$grpc" ] && [ -n "$http" ] || { cat "$WORK/moed.err" >&2; exit 1; }
say "moed from the image serves gRPC on $grpc and HTTP on $http"

# From outside the image: the host's clients.
/usr/bin/python3 - "$http" <<'PY'
import json, sys, urllib.request
base = "http://" + sys.argv[1]
with urllib.request.urlopen(base + "/health", timeout=30) as r:
    assert r.status == 200, r.status
    print("GET /health:", r.read().decode())
body = json.dumps({"model": "demo", "prompt": "The clockmaker", "max_tokens": 8,
                   "temperature": 0, "ignore_eos": True}).encode()
request = urllib.request.Request(base + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as r:
    reply = json.loads(r.read())
assert reply["usage"]["completion_tokens"] == 8, reply
print("POST /v1/completions: 8 tokens,", reply["choices"][0]["finish_reason"])
with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
    metrics = r.read().decode()
assert 'moed_generation_tokens_total{model_name="demo"} 8' in metrics
print("GET /metrics: moed_generation_tokens_total 8")
PY
"$ROOT/build/client/moectl" --server "$grpc" generate --prompt "Once upon" --max-tokens 4 --temperature 0 |
  tee "$WORK/generate.out"
[ -s "$WORK/generate.out" ] || { echo "moectl generate printed nothing" >&2; exit 1; }
# The image's own HEALTHCHECK command, inside the image.
(in_image moectl --server "$grpc" --timeout 5 health)
# SIGTERM drains and exits 0, as a container runtime's stop does.
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=""
[ "$status" -eq 0 ] || { echo "moed exited $status on SIGTERM" >&2; cat "$WORK/moed.err" >&2; exit 1; }
echo "SIGTERM: moed drained and exited 0"

# The Kubernetes pod's path: the init container's script packs the store (here from the demo
# checkpoint it creates), a second run finds it present, and the daemon serves it with the
# base's config file (listen addresses overridden by flags, which take precedence).
rm -rf --one-file-system "$models/demo"
(in_image env MOED_DEMO=1 sh -s) <"$ROOT/deploy/kubernetes/base/prepare-store.sh"
(in_image sh -s) <"$ROOT/deploy/kubernetes/base/prepare-store.sh" | grep -q "expert store present"
install -m 0644 -o 10001 "$ROOT/deploy/kubernetes/base/moed.json" "$models/moed.json"
in_image moed --config /models/moed.json --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  >"$WORK/moed-store.out" 2>"$WORK/moed-store.err" &
pid=$!
for _ in $(seq 600); do [ "$(wc -l <"$WORK/moed-store.out")" -ge 2 ] && break; sleep 0.1; done
http=$(sed -n 's/^http listening on //p' "$WORK/moed-store.out")
[ -n "$http" ] || { cat "$WORK/moed-store.err" >&2; exit 1; }
/usr/bin/python3 - "$http" <<'PY'
import json, sys, urllib.request
base = "http://" + sys.argv[1]
body = json.dumps({"model": "store", "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True}).encode()
request = urllib.request.Request(base + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as r:
    reply = json.loads(r.read())
assert reply["usage"]["completion_tokens"] == 4, reply
with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
    metrics = r.read().decode()
assert "moed_expert_cache_ssd_reads_total" in metrics
print("the store the init script packed serves: 4 tokens, expert-cache series present")
PY
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=""
[ "$status" -eq 0 ] || { echo "moed (store) exited $status on SIGTERM" >&2; exit 1; }
echo "image size: $size bytes ($((size / 1048576)) MiB); build ${build_seconds}s"
