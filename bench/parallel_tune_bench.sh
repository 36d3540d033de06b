#!/usr/bin/env bash
# Two tune runs (`all`, uniform25 of the tiny default) one after the other at 2 threads each, against the same two
# at the same time at 1 thread each: whether running a study's tunes two at a time (`make study-queue` with
# `--jobs 2`) would shorten it on a 2-core machine (issue 20's 90-minute target). Needs `make repro` done first
# (it copies data/prepared and models/ of this checkout; each run gets its own copy and its own MLflow store, as
# concurrent first use of one SQLite store races in MLflow's schema migration). Prints one line and writes
# bench/parallel_tune_bench.last.json. The thread count changes the floating-point results, so the two halves
# train slightly different models: this measures time only.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/vr-parallel.XXXXXX)}"
for half in sequential parallel; do
  mkdir -p "$work/$half/models"
  cp -r "$repo"/{pipeline,stages,configs,params.yaml} "$repo/data" "$work/$half/"
  cp -r "$repo/models/base" "$repo/models/projector" "$work/$half/models/"
done
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VR_PREFECT=0
tune() {  # half, run, threads
  (cd "$work/$1" && MLFLOW_TRACKING_URI="sqlite:///$work/$1/mlruns-$2.db" OMP_NUM_THREADS=$3 \
    "$repo/.venv/bin/python" -m stages.tune --run "$2" > "$work/$1-$2.log" 2>&1)
}
load=$(cut -d' ' -f1 /proc/loadavg)
t0=$(date +%s.%N)
tune sequential all 2
tune sequential uniform25 2
t1=$(date +%s.%N)
tune parallel all 1 & a=$!
tune parallel uniform25 1 & b=$!
wait $a
wait $b
t2=$(date +%s.%N)
python3 - "$t0" "$t1" "$t2" "$load" "$(cut -d' ' -f1 /proc/loadavg)" "$repo/bench/parallel_tune_bench.last.json" <<'PY'
import json, os, sys
t0, t1, t2, load_before, load_after = map(float, sys.argv[1:6])
out = {"sequential_2_threads_s": round(t1 - t0, 1), "parallel_1_thread_s": round(t2 - t1, 1),
       "parallel_over_sequential": round((t2 - t1) / (t1 - t0), 3), "cpus": os.cpu_count(),
       "loadavg_1m_before": load_before, "loadavg_1m_after": load_after}
tmp = sys.argv[6] + ".tmp"
with open(tmp, "w") as f:
    json.dump(out, f, indent=2)
os.replace(tmp, sys.argv[6])
print(f"two tunes: one after the other at 2 threads {out['sequential_2_threads_s']} s, side by side at 1 thread "
      f"{out['parallel_1_thread_s']} s, ratio {out['parallel_over_sequential']}")
PY
