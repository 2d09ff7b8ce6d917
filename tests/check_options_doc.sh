#!/bin/sh
# docs/configuration.md must hold exactly the option table that `moed --help-markdown` prints.
set -eu
moed=$1
doc=$2
expected=$("$moed" --help-markdown)
actual=$(sed -n '/<!-- options:begin -->/,/<!-- options:end -->/p' "$doc" | sed '1d;$d')
if [ "$expected" != "$actual" ]; then
  echo "docs/configuration.md is out of date; regenerate its table with: moed --help-markdown" >&2
  printf '%s\n' "$expected" > /tmp/moed_options_expected.$$
  printf '%s\n' "$actual" | diff /tmp/moed_options_expected.$$ - >&2 || true
  rm -f /tmp/moed_options_expected.$$
  exit 1
fi
echo "options table matches ($(printf '%s\n' "$expected" | wc -l) lines)"
