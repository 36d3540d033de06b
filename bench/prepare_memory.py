"""Where the `prepare` stage's main-process memory goes, phase by phase (a benchmark, not a test: nothing here passes
or fails on a threshold).

    .venv/bin/python bench/prepare_memory.py --sizes 1000 3000 --runs 3      # ~15 s a run on 2 cores
    .venv/bin/python bench/prepare_memory.py --sizes 3000 --save-repeats 4   # the visual save 4 times in one process

Source data: bench/data_bench.py's generator (640x480 JPEGs of ~40-80 KB, LLaVA-665K / Pretrain-558K JSON, 10%
text-only), generated once into <workdir>/source and reused while its stamp (seed, largest size) matches.

Each run is a fresh process (one at a time) that calls `pipeline.data.prepare_all` with data_bench.py's data params
for that size, while a thread samples /proc/self/smaps_rollup every --poll s: `Anonymous` (heap: Python objects,
malloc, pyarrow's pool) and `Rss` (also the file-backed pages: the memory-mapped Arrow files being read). Samples are
labelled by phase, set by wrappers around the functions that begin them:

    synthetic       the synthetic splits built before the first import
    staging         pipeline.data.llava._stage_records (the JSON streamed into the work file)
    validation      datasets.Dataset.from_generator (in --num-proc workers when the JSON has more than one chunk)
    error scan      the rest of import_llava_json (status columns, error rows, report)
    split building  after an import, until the first save_to_disk
    save_to_disk    every Dataset.save_to_disk (the visual DatasetDict, text, text_qa)
    content hash    pipeline.data.prepare.tree_digest

Also recorded: pyarrow's pool peak (`max_memory()`), the most it held live at a phase boundary, and the largest
table one save_to_disk write batch held (its image bytes set the size of the batch's copies). With --save-repeats R
the visual DatasetDict is saved R-1 more times (into scratch folders, removed), so one process writes as many image
batches as an R x N save would.

Output: one markdown row per run, and the slope of the mean peak anonymous memory between the smallest and the
largest size (MB per instruct record), to --json as well.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHASES = ("synthetic", "staging", "validation", "error scan", "split building", "save_to_disk", "content hash")
MB = 1e6


def smaps_mb() -> dict[str, float]:
    """Anonymous and Rss of this process in MB (/proc/self/smaps_rollup)."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, *rest = line.split()
            if key in ("Rss:", "Anonymous:"):
                out[key[:-1]] = int(rest[0]) * 1024 / MB
    return out


def child(args: argparse.Namespace) -> int:
    """One measured prepare_all in this process; prints one JSON line."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    import data_bench
    import datasets
    import pyarrow
    from datasets import arrow_writer

    from pipeline.data import llava, prepare
    from pipeline.data.schema import DataConfig

    state = {"phase": "synthetic", "largest_batch": 0, "pool_at_phase_ends": 0}
    peaks: dict[str, dict[str, float]] = {}
    lock = threading.Lock()

    def sample() -> None:
        now = smaps_mb()
        with lock:
            peak = peaks.setdefault(state["phase"], {"anon": 0.0, "rss": 0.0})
            peak["anon"] = max(peak["anon"], now["Anonymous"])
            peak["rss"] = max(peak["rss"], now["Rss"])

    def enter(phase: str) -> None:
        sample()  # the end of the phase before
        state["pool_at_phase_ends"] = max(state["pool_at_phase_ends"], pyarrow.total_allocated_bytes())
        state["phase"] = phase
        sample()

    def sampler() -> None:
        while True:
            sample()
            time.sleep(args.poll)

    def starts(phase: str, function):
        def wrapped(*a, **k):
            enter(phase)
            return function(*a, **k)
        return wrapped

    def then(function, phase: str):
        def wrapped(*a, **k):
            result = function(*a, **k)
            enter(phase)
            return result
        return wrapped

    def repeated_save(function):
        def wrapped(self, path, *a, **k):
            function(self, path, *a, **k)
            if Path(path).name == "visual":
                import shutil

                for repeat in range(2, args.save_repeats + 1):
                    scratch = f"{path}-repeat{repeat}"
                    function(self, scratch, *a, **k)
                    shutil.rmtree(scratch)
        return wrapped

    def write_table(function):
        def wrapped(self, pa_table, *a, **k):
            state["largest_batch"] = max(state["largest_batch"], pa_table.nbytes)
            return function(self, pa_table, *a, **k)
        return wrapped

    llava._stage_records = starts("staging", llava._stage_records)
    datasets.Dataset.from_generator = staticmethod(then(starts("validation", datasets.Dataset.from_generator),
                                                        "error scan"))
    prepare.import_llava_json = then(prepare.import_llava_json, "split building")
    datasets.Dataset.save_to_disk = starts("save_to_disk", datasets.Dataset.save_to_disk)
    datasets.DatasetDict.save_to_disk = repeated_save(datasets.DatasetDict.save_to_disk)
    arrow_writer.ArrowWriter._write_table = write_table(arrow_writer.ArrowWriter._write_table)
    prepare.tree_digest = starts("content hash", prepare.tree_digest)

    bench_args = data_bench.parse(["--num-proc", str(args.num_proc)])
    cfg = DataConfig(**data_bench.build_params(bench_args, Path(args.source), args.child)["data"])
    threading.Thread(target=sampler, daemon=True).start()
    start = time.perf_counter()
    prepare.prepare_all(cfg, Path(args.out))
    enter("done")
    print(json.dumps({
        "size": args.child, "seconds": time.perf_counter() - start,
        "anon_peak_mb": {p: peaks[p]["anon"] for p in PHASES if p in peaks},
        "rss_peak_mb": max(v["rss"] for v in peaks.values()),
        "anon_after_mb": peaks["done"]["anon"],
        "pyarrow_pool_peak_mb": pyarrow.default_memory_pool().max_memory() / MB,
        "largest_save_batch_mb": state["largest_batch"] / MB,
        "pyarrow_live_at_phase_ends_mb": state["pool_at_phase_ends"] / MB,
    }))
    return 0


def ensure_source(source: Path, seed: int, sizes: list[int]) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import data_bench

    stamp = source / "prepare_memory.stamp.json"
    want = {"seed": seed, "largest": max(sizes)}
    have = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if have.get("seed") == seed and have.get("largest", 0) >= max(sizes) and all(
            (source / f"instruct_{n}.json").is_file() for n in sizes):
        return
    print(f"[prepare_memory] generating {max(sizes)} records into {source} ...", file=sys.stderr, flush=True)
    data_bench.generate_source(source, seed, sorted(set(sizes)), procs=1, images="shared")  # the shape it was measured with
    stamp.write_text(json.dumps(want))


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000], help="instruct records per run")
    ap.add_argument("--runs", type=int, default=1, help="fresh processes per size")
    ap.add_argument("--save-repeats", type=int, default=1, help="times the visual DatasetDict is saved per run")
    ap.add_argument("--num-proc", type=int, default=2, help="data.num_proc")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--poll", type=float, default=0.01, help="seconds between memory samples")
    ap.add_argument("--workdir", default="/tmp/vr-prepare-memory", help="source data (kept) and scratch outputs")
    ap.add_argument("--json", default=str(REPO / "bench" / "prepare_memory.last.json"))
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--source", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if any(n < 1 for n in args.sizes) or args.runs < 1 or args.save_repeats < 1:
        ap.error("--sizes, --runs and --save-repeats must be >= 1")
    args.sizes = sorted(set(args.sizes))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.child is not None:
        return child(args)
    import shutil

    sys.path.insert(0, str(REPO / "bench"))
    import _llava

    work = Path(args.workdir).resolve()
    source = work / "source"
    ensure_source(source, args.seed, args.sizes)
    load_before = os.getloadavg()[0]
    runs = []
    for n in args.sizes:
        for run in range(args.runs):
            out = work / "prepared"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, __file__, "--child", str(n), "--source", str(source), "--out", str(out),
                   "--num-proc", str(args.num_proc), "--poll", str(args.poll), "--save-repeats", str(args.save_repeats)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return 1
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]) | {"run": run})
            print(f"[prepare_memory] N={n} run {run}: peak anon {max(runs[-1]['anon_peak_mb'].values()):.0f} MB",
                  file=sys.stderr, flush=True)
    shutil.rmtree(work / "prepared", ignore_errors=True)

    def mean_peak(n: int) -> float:
        peaks = [max(r["anon_peak_mb"].values()) for r in runs if r["size"] == n]
        return sum(peaks) / len(peaks)

    lo, hi = args.sizes[0], args.sizes[-1]
    slope = (mean_peak(hi) - mean_peak(lo)) / (hi - lo) if hi > lo else None
    header = ["N", "run", *(f"{p} MB" for p in PHASES), "peak RSS MB", "anon after MB", "pyarrow pool peak MB",
              "pyarrow live at phase ends MB", "largest save batch MB", "s"]
    rows = [[f"{r['size']:,}", r["run"], *(f"{r['anon_peak_mb'][p]:.0f}" if p in r["anon_peak_mb"] else "–"
                                           for p in PHASES),
             f"{r['rss_peak_mb']:.0f}", f"{r['anon_after_mb']:.0f}", f"{r['pyarrow_pool_peak_mb']:.1f}",
             f"{r['pyarrow_live_at_phase_ends_mb']:.1f}", f"{r['largest_save_batch_mb']:.1f}", f"{r['seconds']:.1f}"]
            for r in runs]
    text = "Peak anonymous memory of the main process per phase (MB)\n\n" + _llava.md_table(header, rows)
    if slope is not None:
        text += (f"\n\nMean peak anonymous memory: {mean_peak(lo):.0f} MB at {lo:,}, {mean_peak(hi):.0f} MB at "
                 f"{hi:,}: {slope:.4f} MB per record.")
    text += f"\nSave repeats {args.save_repeats}; load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}."
    result = {"config": {k: getattr(args, k) for k in ("sizes", "runs", "save_repeats", "num_proc", "seed", "poll")},
              "runs": runs, "mean_peak_anon_mb": {n: mean_peak(n) for n in args.sizes},
              "slope_mb_per_record": slope}
    _llava.publish(result, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
