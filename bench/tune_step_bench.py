"""Tune-step benchmark: the tiny default's `tune` stage on the code of two commits, side by side in one run (a
benchmark, not a test: nothing here passes or fails on a threshold).

    .venv/bin/python bench/tune_step_bench.py                     # the code before issue 16's data package vs HEAD
    .venv/bin/python bench/tune_step_bench.py --old 6f64e42 --new HEAD --steps 300 --rounds 2

Issue 16 asked that the lazy data path keep the tiny default's tune step within 5% of the code before it (the
`--old` default, 6f64e42, is the last commit before `pipeline/data` became a package with lazy training samples).

What it does:

1. A git worktree of each commit under --workdir (the same .venv: the lock file only gained packages since then).
2. In each, the tiny default's params.yaml with shortened pretraining (vision and LM pretraining, the projector:
   --base-steps steps each; what the tune step costs does not depend on how well the base was trained) and
   `tune.train.max_steps` = --steps, then `python -m stages.prepare`, `build_base`, `pretrain_projector`.
3. `python -m stages.tune --run all` and `--run uniform25`, alternately on the old and the new code (old, new, new,
   old per round, so that a drift of the machine's load hits both alike), --rounds rounds. Per run: the stage's wall
   seconds (process start to exit: imports, data set-up, training, saving, MLflow), its CPU seconds, and the
   training loop's `train_seconds` (runs/tune/<run>.json, or metrics/tune/<run>.json before issue 22).
4. One markdown table per tune run (median over rounds, new / old ratios), written with every sample to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
OLD_DEFAULT = "6f64e42"  # the parent of a383806 (issue 16: pipeline/data as a package, lazy training samples)


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def stage_env(ws: Path) -> dict:
    env = {**os.environ, "VR_PARAMS": str(ws / "bench-params.yaml"), "VR_PREFECT": "0", "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlruns.db'}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("PREFECT_API_URL", None)
    return env


def run_stage(ws: Path, *args: str) -> tuple[float, float]:
    """Runs `python -m stages.<args>` in `ws`; its wall seconds and CPU seconds (user + system, from wait4: what
    another job on shared cores inflates less). A failing stage stops the bench with its log."""
    log = ws / "bench-logs" / ("_".join(args).replace("-", "") + ".log")
    log.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"stages.{args[0]}", *args[1:]], cwd=ws, env=stage_env(ws),
                                stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{ws.name}: stages.{' '.join(args)} exited {proc.returncode}; its log: {log}\n{log.read_text()[-3000:]}")
    return seconds, usage.ru_utime + usage.ru_stime


def train_record(ws: Path, run: str) -> dict:
    """train_seconds and steps of the last tune of `run`: from its run record (runs/tune/<run>.json) where the code
    writes one, else from metrics/tune/<run>.json, where the code before issue 22 kept them."""
    metrics = json.loads((ws / "metrics" / "tune" / f"{run}.json").read_text())
    record = ws / "runs" / "tune" / f"{run}.json"
    return metrics | (json.loads(record.read_text()) if record.is_file() else {})


def prepare_workspace(root: Path, label: str, rev: str, steps: int, base_steps: int, runs: list[str]) -> Path:
    ws = root / label
    git("worktree", "add", "--detach", "--force", str(ws), rev)
    (ws / ".venv").symlink_to(REPO / ".venv")
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for section in ("vision_pretrain", "lm_pretrain", "pretrain_projector"):
        params[section]["train"].update(max_steps=base_steps, save_steps=base_steps)
    params["tune"]["train"].update(max_steps=steps, save_steps=steps)
    kept = ["all", *[run for run in runs if run != "all"]]  # all: the baseline
    params["tune"]["runs"] = {name: params["tune"]["runs"][name] for name in kept}
    params["prune"]["curve"]["runs"] = [name for name in params["prune"]["curve"]["runs"] if name in kept]
    (ws / "bench-params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("prepare", "build_base", "pretrain_projector"):
        print(f"{label} ({rev}): {stage} ...", flush=True)
        run_stage(ws, stage)
    return ws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default=OLD_DEFAULT, help="the reference commit (default: %(default)s)")
    ap.add_argument("--new", default="HEAD", help="the commit measured against it (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=300, help="tune.train.max_steps of each tune run")
    ap.add_argument("--base-steps", type=int, default=20, help="steps of each pretraining stage")
    ap.add_argument("--rounds", type=int, default=2, help="old, new, new, old per round")
    ap.add_argument("--runs", nargs="+", default=["all", "uniform25"], help="tune runs of params.yaml to time")
    ap.add_argument("--workdir", default=None, help="default: a new temp dir, removed at the end unless --keep")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=str(REPO / "bench" / "tune_step_bench.last.json"))
    args = ap.parse_args()

    revs = {"old": git("rev-parse", "--short", args.old), "new": git("rev-parse", "--short", args.new)}
    root = Path(args.workdir or tempfile.mkdtemp(prefix="vr-tune-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    samples: dict[str, dict[str, list[dict]]] = {label: {run: [] for run in args.runs} for label in revs}
    try:
        spaces = {label: prepare_workspace(root, label, rev, args.steps, args.base_steps, args.runs)
                  for label, rev in revs.items()}
        for round_index in range(args.rounds):
            for label in ("old", "new", "new", "old"):
                for run in args.runs:
                    wall, cpu = run_stage(spaces[label], "tune", "--run", run)
                    record = train_record(spaces[label], run)
                    samples[label][run].append({"round": round_index, "wall_s": wall, "cpu_s": cpu,
                                                "train_s": record["train_seconds"], "steps": record["steps"]})
                    print(f"round {round_index} {label} tune {run}: wall {wall:.1f} s, cpu {cpu:.1f} s, "
                          f"train {record['train_seconds']:.1f} s ({record['steps']} steps)", flush=True)
    finally:
        for label in revs:
            if (root / label).exists():
                subprocess.run(["git", "worktree", "remove", "--force", str(root / label)], cwd=REPO,
                               capture_output=True)
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)

    def median(label: str, run: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[label][run])

    lines = [f"Tune-step bench: the tiny default's `tune` stage, {args.steps} steps, old {revs['old']} vs new "
             f"{revs['new']}, {args.rounds} rounds of old, new, new, old (medians).", "",
             "| run | old wall s | new wall s | wall new/old | old CPU s | new CPU s | CPU new/old | old train s "
             "| new train s | train new/old | old ms/step | new ms/step |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for run in args.runs:
        row = {key: {label: median(label, run, key) for label in revs} for key in ("wall_s", "cpu_s", "train_s")}
        for key in ("wall", "cpu", "train"):
            row[f"{key}_ratio"] = row[f"{key}_s"]["new"] / row[f"{key}_s"]["old"]
        summary[run] = row
        lines.append(f"| {run} | {row['wall_s']['old']:.1f} | {row['wall_s']['new']:.1f} | {row['wall_ratio']:.3f} | "
                     f"{row['cpu_s']['old']:.1f} | {row['cpu_s']['new']:.1f} | {row['cpu_ratio']:.3f} | "
                     f"{row['train_s']['old']:.1f} | {row['train_s']['new']:.1f} | {row['train_ratio']:.3f} | "
                     f"{1000 * row['train_s']['old'] / args.steps:.0f} | {1000 * row['train_s']['new'] / args.steps:.0f} |")
    lines += ["", f"{os.cpu_count()} CPUs, load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}."]
    markdown = "\n".join(lines)
    print("\n" + markdown)
    out = Path(args.json)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": vars(args), "revs": revs, "samples": samples, "summary": summary,
                               "markdown": markdown}, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
