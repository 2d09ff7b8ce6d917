#!/bin/sh
# 256 streamed completions beside 2,000 idle keep-alive connections against a real daemon with
# its default limits: every stream must end with exactly its tokens counted, every idle
# connection must still be served. Arguments: moed, moed-synth, the load tool. The idle timeout
# is long because a sanitizer build can take minutes over the streams.
set -eu
moed=$1 synth=$2 load=$3
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
"$synth" --arch mixtral --preset demo --out "$work/demo" >/dev/null
"$moed" --model "$work/demo" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --log-level warn \
  --http-idle-seconds 3600 \
  >"$work/out" 2>"$work/err" &
pid=$!
for _ in $(seq 300); do
  [ "$(wc -l <"$work/out")" -ge 2 ] && break
  sleep 0.1
done
http=$(sed -n 's/^http listening on //p' "$work/out")
[ -n "$http" ] || { cat "$work/err" >&2; echo "moed did not start" >&2; exit 1; }
/usr/bin/python3 "$load" --server "$http" --model demo --streams 256 --idle 2000 --max-tokens 32
