#!/usr/bin/env bash
# Run one benchmark at two git revisions of loraplex, alternately, in one run of the machine, so
# that a change is judged against its parent under the same load (ratios, never absolute times).
#
#   bash benchmarks/ab_revisions.sh BEFORE AFTER ROUNDS SCRIPT [ARGS…]
#   e.g. bash benchmarks/ab_revisions.sh 33db044 HEAD 2 benchmarks/lora_overhead.py --models default
#
# Each revision is checked out (detached) under a temporary folder and the package imported from
# there (PYTHONPATH), with this checkout's .venv and this checkout's SCRIPT (the same benchmark
# code measures both); each run's stdout and `--out` JSON go to benchmarks/out/ab/<revision>-<round>/.
set -euo pipefail
cd "$(dirname "$0")/.."
before=$1 after=$2 rounds=$3 script=$4
shift 4
work=$(mktemp -d)
trap 'for rev in "$work"/*; do git worktree remove --force "$rev" 2>/dev/null || true; done; rm -rf "$work"' EXIT
for rev in "$before" "$after"; do
  git worktree add -q --detach "$work/$rev" "$rev"
done
for round in $(seq 1 "$rounds"); do
  for rev in "$before" "$after"; do
    out="benchmarks/out/ab/$rev-$round"
    mkdir -p "$out"
    echo "== $rev, round $round"
    PYTHONPATH="$work/$rev" .venv/bin/python "$script" "$@" --out "$out" | tee "$out/stdout.txt"
  done
done
