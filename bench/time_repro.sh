#!/usr/bin/env bash
# Measures the spine's targets from one run: set-up on a fresh clone, `make repro` of the tiny default, and a second
# `dvc repro` with nothing changed. Prints a markdown table and writes bench/time_repro.json in the clone.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/vr-bench.XXXXXX)}"
git clone -q "$src" "$work/repo"
cd "$work/repo"
t() { local s; s=$(date +%s.%N); "$@" > "$work/$(echo "$*" | tr ' /' '__').log" 2>&1; python3 -c "print($(date +%s.%N) - $s)"; }
setup=$(t make setup)
repro=$(t make repro)
noop=$(t .venv/bin/dvc repro)
printf '| step | seconds | target |\n|---|---|---|\n| set-up (fresh clone) | %.0f | <= 600 |\n| make repro (tiny default) | %.0f | <= 600 |\n| dvc repro, nothing changed | %.1f | <= 15 |\n' "$setup" "$repro" "$noop"
printf '{"setup_s": %s, "repro_s": %s, "noop_repro_s": %s}\n' "$setup" "$repro" "$noop" > bench_time_repro.json
.venv/bin/dvc metrics show --precision 3 2>/dev/null | head -60
cat reports/summary.md
