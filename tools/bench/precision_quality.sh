#!/bin/sh
# What each precision setting costs against exact mode, by `moectl eval`: one line per setting
# (KL divergence, top-1 agreement, greedy agreement, fallbacks).
#
#   tools/bench/precision_quality.sh STORE PROMPTS.jsonl BUDGET [MAX_TOKENS]
#
# BUDGET: the device cache budget (bytes, K/M/G suffixes). Settings: exact; threshold with
# int4 at τ = 0.1, 0.2, 0.3, 0.4, 0.5; always with int8 and with int4; always with the int4
# floor.
set -eu
store=$1 prompts=$2 budget=$3 max_tokens=${4:-16}
moectl=${MOECTL:-build/client/moectl}
printf '%-22s %12s %8s %8s %9s\n' setting kl_mean top1 greedy fallbacks
run() {
  label=$1
  shift
  "$moectl" eval --store "$store" --prompts "$prompts" --device-cache-bytes "$budget" \
    --max-tokens "$max_tokens" --prefetch off --json "$@" |
    tail -n 1 |
    /usr/bin/python3 -c 'import json, sys
r = json.loads(sys.stdin.read())
print("%-22s %12.3e %8.4f %8.2f %9d" % (sys.argv[1], r["kl_mean"], r["top1_agreement"],
      r["greedy_agreement_tokens"], r["fallbacks"]))' "$label"
}
run exact --precision-policy exact
for tau in 0.1 0.2 0.3 0.4 0.5; do
  run "threshold:int4:$tau" --precision-policy threshold --fallback-precision int4 \
    --fallback-threshold "$tau"
done
run always:int8 --precision-policy always --fallback-precision int8
run always:int4 --precision-policy always --fallback-precision int4
run floor:int4 --precision-policy always --fallback-precision int4 --low-bit-floor true
