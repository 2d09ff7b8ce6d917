#!/usr/bin/env bash
# The deployment files, checked offline (./dev.sh test --deploy): compose, Prometheus, and every
# Kubernetes overlay rendered with kustomize and validated against its schemas and against what
# moed really serves (its options, and the metrics of a live daemon).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD=${MOED_BUILD_DIR:-$ROOT/build}
tmp=$(mktemp -d)
pid=""
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$tmp"' EXIT

docker-compose -f "$ROOT/deploy/compose.yaml" config -q
echo "compose.yaml: docker-compose config accepts it"
promtool check config "$ROOT/deploy/prometheus/prometheus.yml" >/dev/null
promtool check rules "$ROOT/deploy/prometheus/rules.yml" >/dev/null
echo "prometheus.yml and rules.yml: promtool accepts them"
/usr/bin/python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$ROOT/deploy/grafana/moed.json"

# What moed serves: its options, and a scrape of a daemon on an expert store (so that the cache's
# series are there too).
"$BUILD/server/moed" --help-markdown >"$tmp/help.md"
"$BUILD/tools/moed-synth" --arch mixtral --preset tiny --out "$tmp/model" >/dev/null
"$BUILD/tools/moed-pack" --model "$tmp/model" --out "$tmp/store" >/dev/null
"$BUILD/server/moed" --store "$tmp/store" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  >"$tmp/moed.out" 2>"$tmp/moed.err" &
pid=$!
for _ in $(seq 300); do [ "$(wc -l <"$tmp/moed.out")" -ge 2 ] && break; sleep 0.1; done
http=$(sed -n 's/^http listening on //p' "$tmp/moed.out")
[ -n "$http" ] || { cat "$tmp/moed.err" >&2; exit 1; }
/usr/bin/python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())' \
  "http://$http/metrics" >"$tmp/metrics.txt"

for overlay in "$ROOT"/deploy/kubernetes/overlays/*/; do
  name=$(basename "$overlay")
  kubectl kustomize "$overlay" >"$tmp/$name.yaml"
done
node "$ROOT/tests/deploy/validate_manifests.mjs" --help-markdown "$tmp/help.md" \
  --metrics "$tmp/metrics.txt" "$tmp"/*.yaml
