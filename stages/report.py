"""Stage `report`: every run against the `all` baseline (retention), the layer-count sweep, the pruning curves, and
the paper's claims checked on these numbers -- as metrics, a markdown report, figures and DVC plot data.

    python -m stages.report
"""

import json
import math
from pathlib import Path

from stages._common import load_params, run

REPORT = Path("reports/summary.md")
FIGURES = Path("reports/figures")


def clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def describe(spec) -> str:
    if not isinstance(spec.strategy, str):
        return "explicit"
    if spec.strategy == "importance":
        return f"importance: {spec.importance_metric} of `{spec.importance_from}`"
    if spec.strategy == "random":
        return f"random (seed {spec.seed})"
    return spec.strategy + ("" if spec.language_model == "full" else f" ({spec.language_model})")


def run_rows(params) -> dict[str, dict]:
    from pipeline.evaluation import retention

    evals = {name: json.loads(Path(f"metrics/eval/{name}.json").read_text()) for name in params.tune.all_runs()}
    base = evals["all"]["tuned"]
    rows = {}
    for name, spec in params.tune.all_runs().items():
        tuned, pruned = evals[name]["tuned"], evals[name]["pruned"]
        layers = json.loads(Path(f"models/tuned/{name}/selection.json").read_text())["layers"]
        rows[name] = {
            "strategy": describe(spec), "layers": layers, "tuned_layers": len(layers),
            "visual_score": tuned["visual_score"], "visual_retention": retention(tuned["visual_score"], base["visual_score"]),
            "text_qa_accuracy": tuned["text_qa_accuracy"],
            "text_retention": retention(tuned["text_qa_accuracy"], base["text_qa_accuracy"]),
            "text_ppl": tuned["text_ppl"], "train_seconds": tuned["train_seconds"],
            "train_time_ratio": tuned["train_seconds"] / base["train_seconds"],
            "trainable_parameters": tuned["trainable_parameters"], "per_type": tuned["per_type"],
            "pruned_visual_score": pruned["visual_score"],
            "pruned_visual_retention": retention(pruned["visual_score"], base["visual_score"]),
            "pruned_layers": pruned["num_decoder_layers"],
        }
    return rows


def claims(rows: dict, curves: dict) -> list[tuple[str, bool | None, str]]:
    """The paper's claims, each (claim, holds?, evidence); None where the runs needed are not in this pipeline."""
    out = []
    u, top, base = rows.get("uniform25"), rows.get("top25"), rows["all"]
    if u:
        out.append(("uniform 25% keeps >= 95% of the `all` visual score", u["visual_retention"] >= 0.95,
                    f"retention {fmt(u['visual_retention'])}"))
        out.append(("uniform 25% text score >= the `all` run's", u["text_qa_accuracy"] >= base["text_qa_accuracy"],
                    f"text QA {fmt(u['text_qa_accuracy'])} vs {fmt(base['text_qa_accuracy'])}; "
                    f"ppl {fmt(u['text_ppl'], 1)} vs {fmt(base['text_ppl'], 1)}"))
    if u and top:
        out.append(("uniform beats contiguous top", u["visual_score"] > top["visual_score"],
                    f"visual {fmt(u['visual_score'])} vs {fmt(top['visual_score'])}"))
    if "uniform25" in curves and "all" in curves:
        prot = {p["removed_layers"]: p["visual_score"] for p in curves["uniform25"]}
        conv = {p["removed_layers"]: p["visual_score"] for p in curves["all"]}
        ks = [k for k in (1, 2, 3) if k in prot and k in conv]
        if ks:
            out.append((f"protected pruning beats conventional pruning at {ks[0]}-{ks[-1]} removed layers",
                        all(prot[k] > conv[k] for k in ks),
                        "; ".join(f"k={k}: {fmt(prot[k])} vs {fmt(conv[k])}" for k in ks)))
        prot_h, conv_h = healed_scores(curves["uniform25"]), healed_scores(curves["all"])
        ks = [k for k in (1, 2, 3) if k in prot_h and k in conv_h]
        if ks:  # an extension (prune.curve.heal_steps), not one of the paper's claims
            out.append((f"after a healing tune, protected pruning beats conventional at {ks[0]}-{ks[-1]} removed layers",
                        all(prot_h[k] > conv_h[k] for k in ks),
                        "; ".join(f"k={k}: {fmt(prot_h[k])} vs {fmt(conv_h[k])}" for k in ks)))
    return out


def healed_scores(points: list[dict]) -> dict[int, float]:
    """removed layers -> visual score after the healing tune (k = 0: nothing was cut, nothing to heal)."""
    healed = {p["removed_layers"]: p["healed"]["visual_score"] for p in points if "healed" in p}
    return {0: points[0]["visual_score"], **healed} if healed else {}


def figures(rows: dict, curves: dict, sweep: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = FIGURES / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if sweep:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [r["tuned_layers"] for r in sweep]
        ax.plot(xs, [r["visual_retention"] for r in sweep], "o-", label="visual retention")
        ax.plot(xs, [r["text_retention"] for r in sweep], "s--", label="text QA retention")
        ax.set(xlabel="tuned layers (uniform)", ylabel="score / `all` score", title="Layer-count sweep")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.legend()
        save(fig, "retention_vs_layers.png")
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, points in curves.items():
            line, = ax.plot([p["removed_layers"] for p in points], [p["visual_score"] for p in points], "o-",
                            label=f"{name} ({points[-1]['mode']})")
            healed = healed_scores(points)
            if healed:
                ax.plot(list(healed), list(healed.values()), "s--", color=line.get_color(), label=f"{name}, healed")
        ax.set(xlabel="removed layers", ylabel="visual score", title="Pruning curves")
        ax.legend()
        save(fig, "pruning_curves.png")
    for path in sorted(Path("plots/importance").glob("*.json")):
        scores = json.loads(path.read_text())
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for metric, values in scores.items():
            if not isinstance(values, list):
                continue  # e.g. the token counts
            vals = [math.nan if v is None else v for v in values]
            top = max((abs(v) for v in vals if not math.isnan(v)), default=1.0) or 1.0
            ax.plot(range(len(vals)), [v / top for v in vals], marker=".", label=metric)
        ax.set(xlabel="decoder layer", ylabel="score / max", title=f"Per-layer importance: {path.stem}")
        ax.legend(fontsize=6)
        save(fig, f"importance_{path.stem}.png")
    return written


def markdown(rows: dict, curves: dict, checks: list) -> str:
    lines = [
        "# Layer-selection report", "",
        "Retention = score / the `all` run's score. Visual = mean exact-match accuracy over the question types "
        "(digits included); text = held-out text QA accuracy and perplexity.", "",
        "| run | strategy | layers | visual | retention | text QA | text retention | text ppl | train s | time ratio "
        "| pruned visual | pruned retention |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['strategy']} | {','.join(map(str, r['layers']))} | {fmt(r['visual_score'])} | "
            f"{fmt(r['visual_retention'])} | {fmt(r['text_qa_accuracy'])} | {fmt(r['text_retention'])} | "
            f"{fmt(r['text_ppl'], 1)} | {r['train_seconds']:.0f} | {fmt(r['train_time_ratio'], 2)} | "
            f"{fmt(r['pruned_visual_score'])} ({r['pruned_layers']} layers) | {fmt(r['pruned_visual_retention'])} |"
        )
    types = sorted({t for r in rows.values() for t in r["per_type"]})
    lines += ["", "## Accuracy per question type", "", "| run | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    lines += [f"| {name} | " + " | ".join(fmt(r["per_type"].get(t)) for t in types) + " |" for name, r in rows.items()]
    if curves:
        lines += ["", "## Pruning curves (visual score after removing k layers)", "",
                  "| run | mode | " + " | ".join(f"k={p['removed_layers']}" for p in max(curves.values(), key=len)) + " |",
                  "|---|---|" + "---|" * len(max(curves.values(), key=len))]
        for name, points in curves.items():
            lines.append(f"| {name} | {points[-1]['mode']} | " + " | ".join(fmt(p["visual_score"]) for p in points) + " |")
            healed = healed_scores(points)
            if healed:
                lines.append(f"| {name}, healed | {points[-1]['mode']} + healing tune | "
                             + " | ".join(fmt(v) for v in healed.values()) + " |")
    if checks:
        lines += ["", "## The paper's claims on these numbers", ""]
        lines += [f"- {'holds' if ok else 'does not hold'}: {claim} ({evidence})" for claim, ok, evidence in checks]
    if FIGURES.exists():
        lines += ["", "## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in sorted(FIGURES.glob("*.png"))]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    import shutil

    from pipeline import tracking
    from pipeline.storage import atomic_write_json, atomic_write_text

    params = load_params()
    rows = run_rows(params)
    curve_path = Path("metrics/pruning_curve.json")
    curves = json.loads(curve_path.read_text()) if curve_path.exists() else {}
    sweep = sorted((r for name, r in rows.items() if params.tune.all_runs()[name].strategy in ("uniform", "all")
                    and params.tune.all_runs()[name].language_model == "full"), key=lambda r: r["tuned_layers"])
    checks = claims(rows, curves)

    shutil.rmtree(FIGURES, ignore_errors=True)
    written = figures(rows, curves, sweep)
    atomic_write_text("plots/retention_vs_layers.csv", "tuned_layers,visual_retention,text_retention\n" + "".join(
        f"{r['tuned_layers']},{clean(r['visual_retention'])},{clean(r['text_retention'])}\n" for r in sweep))
    summary = {name: {k: clean(v) for k, v in r.items() if k not in ("per_type", "layers", "strategy")} for name, r in rows.items()}
    summary["claims"] = {claim: ok for claim, ok, _ in checks}
    atomic_write_json("metrics/summary.json", summary)
    text = markdown(rows, curves, checks)
    atomic_write_text(REPORT, text)

    mlflow = tracking.setup(params.mlflow.experiment)
    with mlflow.start_run(run_id=tracking.parent_run_id(mlflow, tracking.pipeline_key(params))):
        mlflow.log_text(text, "report/summary.md")
        for path in written:
            mlflow.log_artifact(str(path), "report/figures")


if __name__ == "__main__":
    run(main)
