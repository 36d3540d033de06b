"""Stage `summarize`: retention of every run against the `all` baseline, as metrics and a markdown table."""

import json
import math
from pathlib import Path

from stages._common import load_params, run


def main(argv: list[str]) -> None:
    from pipeline.evaluation import retention
    from pipeline.storage import atomic_write_json, atomic_write_text

    params = load_params()
    evals = {name: json.loads(Path(f"metrics/eval/{name}.json").read_text()) for name in params.tune.runs}
    base = evals["all"]["tuned"]
    summary, lines = {}, [
        "| run | model | layers | visual | retention | text QA | text retention | text ppl | train s | ms/sample |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in evals.items():
        for kind in ("tuned", "pruned"):
            r = res[kind]
            row = {
                "visual_score": r["visual_score"],
                "visual_retention": retention(r["visual_score"], base["visual_score"]),
                "text_qa_accuracy": r["text_qa_accuracy"],
                "text_retention": retention(r["text_qa_accuracy"], base["text_qa_accuracy"]),
                "text_ppl": r["text_ppl"],
                "num_decoder_layers": r["num_decoder_layers"],
                "generation_ms_per_sample": r["generation_ms_per_sample"],
            }
            if kind == "tuned":
                row["train_seconds"] = r["train_seconds"]
            summary[f"{name}.{kind}"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            lines.append(
                f"| {name} | {kind} | {row['num_decoder_layers']} | {row['visual_score']:.3f} | {row['visual_retention']:.3f} | "
                f"{row['text_qa_accuracy']:.3f} | {row['text_retention']:.3f} | {row['text_ppl']:.1f} | "
                f"{row.get('train_seconds', float('nan')):.0f} | {row['generation_ms_per_sample']:.1f} |"
            )
    atomic_write_json("metrics/summary.json", summary)
    atomic_write_text("reports/summary.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    run(main)
