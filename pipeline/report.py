"""The layer-selection report: every tune run against the baseline (retention), the layer-count sweep, the pruning
curves, and the paper's claims checked on these numbers; as rows, a markdown report, figures and CSV plot data.

The claims compare runs picked from params by what they are, not by name (`claim_runs`): the baseline `all` (the
params schema requires it), the first uniform and the first contiguous-top run of a 25% budget in `tune.runs`."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.evaluation import retention

BASELINE = "all"  # the run every retention is measured against (pipeline/config.py requires it in tune.runs)
CLAIM_BUDGET = 0.25  # the paper's share of tuned layers
FIGURE_DPI = 110


def clean(v):
    """NaN as None (JSON null)."""
    return None if isinstance(v, float) and math.isnan(v) else v


def fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def describe(spec) -> str:
    """A tune run's selection in words, e.g. `importance: bi of `all``."""
    if not isinstance(spec.strategy, str):
        return "explicit"
    if spec.strategy == "importance":
        return f"importance: {spec.importance_metric} of `{spec.importance_from}`"
    if spec.strategy == "random":
        return f"random (seed {spec.seed})"
    return spec.strategy + ("" if spec.language_model == "full" else f" ({spec.language_model})")


def run_rows(runs: dict, evals: dict[str, dict], layers: dict[str, list[int]]) -> dict[str, dict]:
    """One row per tune run: its tuned and pruned scores and their retention against the baseline. `runs`: name ->
    the run's params entry (config.TuneRun); `evals`: name -> its metrics/eval JSON; `layers`: name -> its tuned
    layers."""
    base = evals[BASELINE]["tuned"]
    rows = {}
    for name, spec in runs.items():
        tuned, pruned = evals[name]["tuned"], evals[name]["pruned"]
        rows[name] = {
            "strategy": describe(spec), "layers": layers[name], "tuned_layers": len(layers[name]),
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


def sweep_rows(rows: dict[str, dict], runs: dict) -> list[dict]:
    """The layer-count sweep: the uniform runs (and the baseline) with a fully tuned LM, by number of tuned layers."""
    return sorted((r for name, r in rows.items() if runs[name].strategy in ("uniform", "all")
                   and runs[name].language_model == "full"), key=lambda r: r["tuned_layers"])


def claim_runs(runs: dict) -> dict[str, str | None]:
    """The runs the paper's claims compare with the baseline, by their params entry: `uniform` and `top`, the first
    run with that strategy and a budget of CLAIM_BUDGET (None where there is none)."""
    def first(strategy: str) -> str | None:
        return next((name for name, spec in runs.items()
                     if spec.strategy == strategy and spec.budget == CLAIM_BUDGET), None)

    return {"uniform": first("uniform"), "top": first("top")}


def claims(rows: dict, curves: dict, compared: dict[str, str | None]) -> list[tuple[str, bool | None, str]]:
    """The paper's claims, each (claim, holds?, evidence); only those whose runs are in this pipeline. `compared`:
    `claim_runs`."""
    out = []
    u, top, base = rows.get(compared["uniform"]), rows.get(compared["top"]), rows[BASELINE]
    if u:
        out.append(("uniform 25% keeps >= 95% of the `all` visual score", u["visual_retention"] >= 0.95,
                    f"retention {fmt(u['visual_retention'])}"))
        out.append(("uniform 25% text score >= the `all` run's", u["text_qa_accuracy"] >= base["text_qa_accuracy"],
                    f"text QA {fmt(u['text_qa_accuracy'])} vs {fmt(base['text_qa_accuracy'])}; "
                    f"ppl {fmt(u['text_ppl'], 1)} vs {fmt(base['text_ppl'], 1)}"))
    if u and top:
        out.append(("uniform beats contiguous top", u["visual_score"] > top["visual_score"],
                    f"visual {fmt(u['visual_score'])} vs {fmt(top['visual_score'])}"))
    if compared["uniform"] in curves and BASELINE in curves:
        protected, conventional = curves[compared["uniform"]], curves[BASELINE]
        prot = {p["removed_layers"]: p["visual_score"] for p in protected}
        conv = {p["removed_layers"]: p["visual_score"] for p in conventional}
        ks = [k for k in (1, 2, 3) if k in prot and k in conv]
        if ks:
            out.append((f"protected pruning beats conventional pruning at {ks[0]}-{ks[-1]} removed layers",
                        all(prot[k] > conv[k] for k in ks),
                        "; ".join(f"k={k}: {fmt(prot[k])} vs {fmt(conv[k])}" for k in ks)))
        prot_h, conv_h = healed_scores(protected), healed_scores(conventional)
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


PRETRAINING_LOSSES = ("vision_pretrain", "lm_pretrain", "projector")  # plots/loss/<name>.csv of the shared stages


def figures(curves: dict, sweep: list[dict], importance: dict[str, dict], out_dir: Path,
            losses: dict[str, list[tuple[int, float]]] | None = None) -> list[Path]:
    """The report's PNG figures, written into `out_dir`: retention against tuned layers (the sweep), the pruning
    curves, each run's per-layer importance (`importance`: run -> its scores JSON) and the training losses (`losses`:
    plots/loss/<name>.csv as (step, loss) rows). One series per run, one scale per axis: they are also what `dvc plots
    show` renders (offline, unlike its vega charts). Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=FIGURE_DPI)
        plt.close(fig)
        written.append(path)

    if sweep:  # visual and text retention on axes of their own: text retention can be several times 1
        fig, (visual_ax, text_ax) = plt.subplots(1, 2, figsize=(8, 3.5))
        xs = [r["tuned_layers"] for r in sweep]
        visual_ax.plot(xs, [r["visual_retention"] for r in sweep], "o-")
        visual_ax.set(xlabel="tuned layers (uniform)", ylabel="visual score / `all` score", title="Visual retention")
        text_ax.plot(xs, [r["text_retention"] for r in sweep], "s--", color="tab:orange")
        text_ax.set(xlabel="tuned layers (uniform)", ylabel="text QA / `all` text QA", title="Text QA retention")
        for ax in (visual_ax, text_ax):
            ax.axhline(1.0, color="grey", lw=0.5)
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
    for run, scores in importance.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for metric, values in scores.items():
            if not isinstance(values, list):
                continue  # e.g. the token counts
            vals = [math.nan if v is None else v for v in values]
            top = max((abs(v) for v in vals if not math.isnan(v)), default=1.0) or 1.0
            ax.plot(range(len(vals)), [v / top for v in vals], marker=".", label=metric)
        ax.set(xlabel="decoder layer", ylabel="score / max", title=f"Per-layer importance: {run}")
        ax.legend(fontsize=6)
        save(fig, f"importance_{run}.png")
    if losses:  # each pretraining loss on its own axis (different losses), the tune runs together on one
        shared = [name for name in PRETRAINING_LOSSES if name in losses]
        tuned = sorted(name for name in losses if name not in PRETRAINING_LOSSES)
        panels = [[name] for name in shared] + ([tuned] if tuned else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
        for ax, names in zip(axes[0], panels):
            for name in names:
                ax.plot([step for step, _ in losses[name]], [loss for _, loss in losses[name]], lw=1, label=name)
            ax.set(xlabel="step", ylabel="loss", title="tune" if names is tuned else names[0])
            if names is tuned:
                ax.legend(fontsize=6)
        save(fig, "training_loss.png")
    return written


def read_loss_csv(text: str) -> list[tuple[int, float]]:
    """plots/loss/<name>.csv (`step,loss` with a header) as (step, loss) rows."""
    rows = [line.split(",") for line in text.splitlines()[1:] if line.strip()]
    return [(int(step), float(loss)) for step, loss, *_ in rows]


def markdown(rows: dict, curves: dict, checks: list, figure_links: list[str]) -> str:
    """The report. `figure_links`: the figures' paths relative to the report."""
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
        longest = max(curves.values(), key=len)
        lines += ["", "## Pruning curves (visual score after removing k layers)", "",
                  "| run | mode | " + " | ".join(f"k={p['removed_layers']}" for p in longest) + " |",
                  "|---|---|" + "---|" * len(longest)]
        for name, points in curves.items():
            lines.append(f"| {name} | {points[-1]['mode']} | " + " | ".join(fmt(p["visual_score"]) for p in points) + " |")
            healed = healed_scores(points)
            if healed:
                lines.append(f"| {name}, healed | {points[-1]['mode']} + healing tune | "
                             + " | ".join(fmt(v) for v in healed.values()) + " |")
    if checks:
        lines += ["", "## The paper's claims on these numbers", ""]
        lines += [f"- {'holds' if ok else 'does not hold'}: {claim} ({evidence})" for claim, ok, evidence in checks]
    lines += ["", "## Figures", ""] + [f"![{Path(link).stem}]({link})" for link in figure_links]
    return "\n".join(lines) + "\n"


def retention_csv(sweep: list[dict]) -> str:
    """The sweep as DVC plot data."""
    return "tuned_layers,visual_retention,text_retention\n" + "".join(
        f"{r['tuned_layers']},{clean(r['visual_retention'])},{clean(r['text_retention'])}\n" for r in sweep)


def summary(rows: dict, checks: list) -> dict:
    """The report's metrics: each run's numbers (NaN as null) and whether each claim holds."""
    out = {name: {k: clean(v) for k, v in r.items() if k not in ("per_type", "layers", "strategy")} for name, r in rows.items()}
    out["claims"] = {claim: ok for claim, ok, _ in checks}
    return out
