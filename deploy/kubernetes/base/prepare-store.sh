#!/bin/sh
# The init container: makes /models/store from the checkpoint in /models/checkpoint when the
# store is missing. Replicas share the volume, so one packs while the others wait for it.
# Without a checkpoint, MOED_DEMO=1 creates the synthetic demo model first.
set -eu
store=/models/store
checkpoint=/models/checkpoint
lock=/models/.prepare-store.lock
if [ -f "$store/manifest.json" ]; then
  echo "expert store present at $store"
  exit 0
fi
until mkdir "$lock" 2>/dev/null; do
  echo "another replica is preparing the store; waiting"
  sleep 5
  if [ -f "$store/manifest.json" ]; then exit 0; fi
done
trap 'rmdir "$lock"' EXIT
if [ ! -f "$checkpoint/config.json" ]; then
  if [ "${MOED_DEMO:-0}" != 1 ]; then
    echo "no checkpoint at $checkpoint (config.json and *.safetensors) and MOED_DEMO is not 1" >&2
    exit 1
  fi
  echo "creating the demo model in $checkpoint"
  moed-synth --arch mixtral --preset demo --out "$checkpoint"
fi
echo "packing $checkpoint into $store (precisions: ${MOED_PACK_PRECISIONS:-source})"
rm -rf "$store.partial"
moed-pack --model "$checkpoint" --out "$store.partial" --precisions "${MOED_PACK_PRECISIONS:-source}"
# The tokenizer and chat template travel with the store, which the daemon serves on its own.
for f in tokenizer.json tokenizer_config.json chat_template.jinja; do
  if [ -f "$checkpoint/$f" ] && [ ! -f "$store.partial/$f" ]; then cp "$checkpoint/$f" "$store.partial/"; fi
done
mv "$store.partial" "$store"
