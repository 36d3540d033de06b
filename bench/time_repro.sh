#!/usr/bin/env bash
# Measures the spine's targets from one run: set-up on a fresh clone, `make repro` of the tiny default, and a second
# `dvc repro` with nothing changed. Prints a markdown table and writes bench/time_repro.json in the clone.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/vr-bench.XXXXXX)}"
git clone -q "$src" "$work/repo"
cd "$work/repo"
# Each output line of a step is prefixed with the time it was printed (epoch seconds), so the stages' shares of
# `make repro` can be read from its log afterwards.
stamp() { python3 -u -c 'import sys, time
for line in sys.stdin: sys.stdout.write(f"{time.time():.2f} {line}")'; }
t() { local s; s=$(date +%s.%N); "$@" 2>&1 | stamp > "$work/$(echo "$*" | tr ' /' '__').log"; python3 -c "print($(date +%s.%N) - $s)"; }
setup=$(t make setup)
repro=$(t make repro)
noop=$(t .venv/bin/dvc repro)
printf '| step | seconds | target |\n|---|---|---|\n| set-up (fresh clone) | %.0f | <= 600 |\n| make repro (tiny default) | %.0f | <= 600 |\n| dvc repro, nothing changed | %.1f | <= 15 |\n' "$setup" "$repro" "$noop"
# Seconds per DVC stage: from one "Running stage '<name>'" line to the next (the last one to the end of the log).
stages=$(python3 - "$work/make_repro.log" <<'PY'
import json, re, sys
lines = [line.split(" ", 1) for line in open(sys.argv[1])]
marks = [(float(t), m.group(1)) for t, rest in lines if (m := re.search(r"Running stage '([^']+)'", rest))]
end = float(lines[-1][0])
print(json.dumps({name: round((marks[i + 1][0] if i + 1 < len(marks) else end) - start, 1)
                  for i, (start, name) in enumerate(marks)}))
PY
)
python3 -c "import json, sys; s = json.loads(sys.argv[1]); print('\n| stage | seconds |\n|---|---|'); [print(f'| {k} | {v:.0f} |') for k, v in sorted(s.items(), key=lambda kv: -kv[1])]" "$stages"
printf '{"setup_s": %s, "repro_s": %s, "noop_repro_s": %s, "stages_s": %s}\n' "$setup" "$repro" "$noop" "$stages" > bench_time_repro.json
.venv/bin/dvc metrics show --precision 3 2>/dev/null | head -60
cat reports/summary.md
