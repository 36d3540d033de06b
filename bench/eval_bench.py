"""Evaluation throughput: questions per second of the visual benchmarks through lm-eval (pipeline/benchmarks), on a
trained checkpoint, unbatched against batched generation, side by side in one run (a benchmark, not a test).

    .venv/bin/python bench/eval_bench.py                                  # models/tuned/all of `make repro`
    .venv/bin/python bench/eval_bench.py --model models/pruned/uniform25 --records 64 --batch-sizes 1 8 32

The benchmark files are generated in their published formats (tests/helpers/benchmark_files.py: small drawn images,
--records questions per task) into --workdir; every batch size scores the same questions. Output: a markdown table
(batch size, questions, seconds, questions/s, speed-up against the first batch size) and the same as JSON
(--json, default bench/eval_bench.last.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "helpers")]

import benchmark_files  # noqa: E402 (the published formats, shared with the tests)

from pipeline.benchmarks import runner  # noqa: E402
from pipeline.config import BenchmarksParams  # noqa: E402

WRITERS = {"pope": benchmark_files.write_pope, "gqa": benchmark_files.write_gqa,
           "textvqa_val": benchmark_files.write_textvqa, "scienceqa_img": benchmark_files.write_scienceqa,
           "mmbench_dev_en": benchmark_files.write_mmbench, "seedbench_img": benchmark_files.write_seedbench}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "tuned" / "all"), help="a saved LLaVA checkpoint")
    parser.add_argument("--tasks", nargs="+", default=["pope", "gqa", "textvqa_val"], choices=sorted(WRITERS))
    parser.add_argument("--records", type=int, default=32, help="questions per task (per POPE split)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=str(REPO / "bench" / "eval_bench.last.json"))
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"eval_bench: {args.model} is not a saved checkpoint (run `make repro` first, or pass --model)")

    data_dir = Path(args.workdir or tempfile.mkdtemp(prefix="vr-eval-bench-")) / "benchmarks"
    for task in args.tasks:
        WRITERS[task](data_dir, n=args.records)
    rows = []
    for batch_size in args.batch_sizes:
        params = BenchmarksParams(tasks=args.tasks, data_dir=str(data_dir), batch_size=batch_size)
        out = runner.run_benchmarks(args.model, params, device="cpu")
        visual = out["throughput"]["visual"]
        rows.append({"batch_size": batch_size, "questions": visual["samples"], "seconds": visual["seconds"],
                     "questions_per_second": visual["samples_per_second"],
                     "visual_average": out["scores"].get("visual_average", {}).get("mean")})
    base = rows[0]["questions_per_second"]
    print(f"Visual benchmarks {', '.join(args.tasks)} on {args.model} (CPU)\n")
    print("| batch size | questions | seconds | questions/s | speed-up | visual average |\n|---|---|---|---|---|---|")
    for row in rows:
        row["speedup"] = row["questions_per_second"] / base
        print(f"| {row['batch_size']} | {row['questions']} | {row['seconds']:.1f} | {row['questions_per_second']:.1f} "
              f"| {row['speedup']:.2f} | {row['visual_average']:.3f} |")
    model = Path(args.model).resolve()
    shown = str(model.relative_to(REPO)) if model.is_relative_to(REPO) else str(model)
    Path(args.json).write_text(json.dumps({"model": shown, "tasks": args.tasks, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
