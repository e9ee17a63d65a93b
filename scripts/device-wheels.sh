#!/usr/bin/env bash
# Wheels the lent GPU host lacks, for scripts/device-bench.sh: that host has Python 3.12 with
# torch and transformers of its own but no registry; the engine needs this project's pinned
# transformers (its modelling API changes between releases) and msgspec. Downloads them into
# .whl/ (ignored by git through .git/info/exclude; the device tool carries it with
# carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { sed -n "s/^ *\"$1==\([^\"]*\)\".*/\1/p" pyproject.toml | head -n 1; }
transformers=$(pin transformers)
msgspec=$(pin msgspec)
[ -n "$transformers" ] && [ -n "$msgspec" ] || { echo "pins not found in pyproject.toml" >&2; exit 1; }
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "transformers==$transformers" "msgspec==$msgspec"
ls -l .whl
