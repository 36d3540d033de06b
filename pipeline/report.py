"""The layer-selection report: every tune run against the baseline (retention), the layer-count sweep, the pruning
curves, the published benchmarks (when the runs were evaluated on any) and the paper's claims checked on these
numbers; as rows, a markdown report, figures and CSV plot data.

The claims compare runs picked from params by what they are, not by name (`claim_runs`): the baseline `all` (the
params schema requires it), the first uniform and the first contiguous-top run of a 25% budget in `tune.runs`."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline import benchmark_scores, intervals
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


def run_rows(runs: dict, evals: dict[str, dict], layers: dict[str, list[int]],
             base_lm: dict | None = None) -> dict[str, dict]:
    """One row per tune run: its tuned and pruned scores and their retention against the baseline. `runs`: name ->
    the run's params entry (config.TuneRun); `evals`: name -> its metrics/eval JSON; `layers`: name -> its tuned
    layers; `base_lm`: metrics/base.json, whose LM scores before any visual tuning (tiny/micro: the same text QA set
    and perplexity windows) give each run's text QA and perplexity against the base LM (None where not measured)."""
    base = evals[BASELINE]["tuned"]
    base_lm = base_lm or {}
    lm_qa, lm_ppl = base_lm.get("lm_text_qa_accuracy"), base_lm.get("lm_ppl_pretrained")
    rows = {}
    for name, spec in runs.items():
        tuned, pruned = evals[name]["tuned"], evals[name]["pruned"]
        rows[name] = {
            "strategy": describe(spec), "layers": layers[name], "tuned_layers": len(layers[name]),
            "visual_score": tuned["visual_score"], "visual_retention": retention(tuned["visual_score"], base["visual_score"]),
            "text_qa_accuracy": tuned["text_qa_accuracy"],
            "text_retention": retention(tuned["text_qa_accuracy"], base["text_qa_accuracy"]),
            "text_qa_vs_base_lm": retention(tuned["text_qa_accuracy"], lm_qa) if lm_qa is not None else None,
            "text_ppl": tuned["text_ppl"], "text_ppl_vs_base_lm": tuned["text_ppl"] / lm_ppl if lm_ppl else None,
            "trainable_parameters": tuned["trainable_parameters"],
            "trainable_ratio": tuned["trainable_parameters"] / base["trainable_parameters"], "per_type": tuned["per_type"],
            "pruned_visual_score": pruned["visual_score"],
            "pruned_visual_retention": retention(pruned["visual_score"], base["visual_score"]),
            "pruned_layers": pruned["num_decoder_layers"],
        }
    return rows


MEANED = ("visual_score", "text_qa_accuracy", "text_qa_vs_base_lm", "text_ppl", "text_ppl_vs_base_lm",
          "pruned_visual_score")  # a selection's numbers over its seed replicas: the mean


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if len(present) == len(values) and present else None


def group_rows(rows: dict[str, dict], replicas: dict[str, list[str]] | None) -> dict[str, dict]:
    """One row per selection (config.TuneParams.replicas: selection -> its seed replicas): a selection of one run is
    that run's row itself; otherwise the mean over its seeds of each of MEANED (and per question type), its retentions
    against the baseline selection's means, and `seeds`, the replicas' names."""
    replicas = replicas or {name: [name] for name in rows}
    if all(len(names) == 1 for names in replicas.values()):
        return {group: rows[names[0]] for group, names in replicas.items()}
    out = {}
    for group, names in replicas.items():
        members = [rows[n] for n in names]
        row = dict(members[0]) | {key: _mean([m[key] for m in members]) for key in MEANED}
        row["per_type"] = {t: _mean([m["per_type"].get(t) for m in members]) for t in members[0]["per_type"]}
        row["seeds"] = names
        out[group] = row
    base = out[_baseline(replicas)]
    for row in out.values():
        row |= {"visual_retention": retention(row["visual_score"], base["visual_score"]),
                "text_retention": retention(row["text_qa_accuracy"], base["text_qa_accuracy"]),
                "pruned_visual_retention": retention(row["pruned_visual_score"], base["visual_score"])}
    return out


def seed_table(selections: dict[str, dict], evals: dict[str, dict], replicas: dict[str, list[str]]) -> dict[str, dict]:
    """The selections with seed replicas (none: {}), each with its means over seeds and the 95% intervals (seeds and
    evaluation samples, pipeline/intervals.py) of its visual score and its visual retention against the baseline."""
    if all(len(names) == 1 for names in replicas.values()):
        return {}
    base_hits = _tuned_hits(evals, replicas[_baseline(replicas)])
    out = {}
    for group, row in selections.items():
        hits = _tuned_hits(evals, replicas[group])
        entry = {key: row[key] for key in ("visual_score", "visual_retention", "text_qa_accuracy", "text_qa_vs_base_lm",
                                           "text_ppl", "pruned_visual_retention")}
        entry["seeds"] = replicas[group]
        if hits is not None:
            entry["visual_score_interval"] = list(intervals.score_interval(hits))
        if hits is not None and base_hits is not None:
            entry["visual_retention_interval"] = list(intervals.retention_interval(hits, base_hits))
        text = _tuned_hits(evals, replicas[group], "text_qa")
        if text is not None:
            entry["text_qa_interval"] = list(intervals.score_interval(text, intervals.accuracy))
        out[group] = entry
    return out


def benchmark_rows(evals: dict[str, dict], kind: str = "tuned") -> dict[str, dict[str, dict]]:
    """The benchmark table of one kind of model (tuned or pruned): score name (pipeline/benchmark_scores.py, e.g.
    `pope_random.f1`; the averages first) -> run -> {"score", "retention"}, retention = score / the `all` run's tuned
    score on that benchmark (None where either is missing or not a number). Every score of any run's metrics is a row;
    {} when no run has a benchmark score (evaluate.benchmarks empty)."""
    found = {name: benchmark_scores.scores(e[kind].get("benchmarks")) for name, e in evals.items()}
    base = benchmark_scores.scores(evals[BASELINE]["tuned"].get("benchmarks"))
    table: dict[str, dict[str, dict]] = {}
    for score_name in benchmark_scores.ordered(n for scores in found.values() for n in scores):
        table[score_name] = {}
        for run, scores in found.items():
            score, baseline = scores.get(score_name), base.get(score_name)
            kept = None if score is None or baseline is None else retention(score, baseline)
            table[score_name][run] = {"score": score, "retention": kept}
    return table


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


def _hits(entry: dict | None, kind: str = "visual"):
    """The decoded per-sample hits of one evaluated model (an eval JSON's "tuned"/"pruned", or a curve point); None
    where they were not recorded (metrics written before the intervals were)."""
    samples = (entry or {}).get("samples")
    return intervals.decode(samples[kind]) if samples else None


def _group_hits(entries: list[dict | None], kind: str = "visual"):
    """The hits of each seed replica of one selection (`entries`: their eval "tuned"/"pruned" or curve points);
    None where any replica's samples were not recorded."""
    found = [_hits(entry, kind) for entry in entries]
    return None if any(h is None for h in found) else found


def _tuned_hits(evals: dict[str, dict], names: list[str], kind: str = "visual"):
    """_group_hits of the tuned models of a selection's replicas `names`."""
    return _group_hits([evals.get(name, {}).get("tuned") for name in names], kind)


def _baseline(replicas: dict[str, list[str]]) -> str:
    """The selection the baseline run belongs to."""
    return next(group for group, names in replicas.items() if BASELINE in names)


def group_curves(curves: dict, replicas: dict[str, list[str]]) -> dict[str, list[dict]]:
    """The pruning curves per selection: each point's visual score the mean over the selection's replicas that have a
    curve, `replicas` their points (for the intervals), at the removed-layer counts every such replica reached."""
    out = {}
    for group, names in replicas.items():
        present = [curves[n] for n in names if n in curves]
        if not present:
            continue
        if len(present) == 1:
            out[group] = [p | {"replicas": [p]} for p in present[0]]
            continue
        ks = sorted(set.intersection(*({p["removed_layers"] for p in pts} for pts in present)))
        points = []
        for k in ks:
            at = [next(p for p in pts if p["removed_layers"] == k) for pts in present]
            point = {"removed_layers": k, "mode": at[0]["mode"], "visual_score": _mean([p["visual_score"] for p in at]),
                     "replicas": at}
            if all("healed" in p for p in at):
                point["healed"] = {"visual_score": _mean([p["healed"]["visual_score"] for p in at]),
                                   "replicas": [p["healed"] for p in at]}
            points.append(point)
        out[group] = points
    return out


def _judged(point_holds: bool, interval_of, *hits, threshold: float, strict: bool = False) -> tuple[str, str]:
    """(verdict, interval text) of a claim: from the paired bootstrap interval when every model's samples are
    recorded; from the point estimates alone otherwise (said so in the text)."""
    if any(h is None for h in hits):
        return ("holds" if point_holds else "fails"), " (no interval: samples not recorded)"
    interval = interval_of(*hits)
    return intervals.verdict(interval, threshold, strict=strict), f" [95% interval {fmt(interval[0])}, {fmt(interval[1])}]"


def claims(rows: dict, curves: dict, compared: dict[str, str | None], evals: dict[str, dict] | None = None,
           replicas: dict[str, list[str]] | None = None) -> list[tuple[str, str, str]]:
    """The paper's claims, each (claim, verdict, evidence); only those whose runs are in this pipeline. `compared`:
    `claim_runs`; `evals`: name -> its metrics/eval JSON, whose per-sample hits give each comparison its paired
    bootstrap interval (pipeline/intervals.py); `replicas` (config.TuneParams.replicas): each compared selection is
    then the mean over its seed replicas, and the interval's resamples draw the seeds too. Verdict: "holds" / "fails"
    when the interval is on one side of the claim's threshold, "within noise" when it straddles it."""
    evals = evals or {}
    replicas = replicas or {name: [name] for name in rows}
    group_of = {name: group for group, names in replicas.items() for name in names}
    selections = group_rows(rows, replicas)
    out = []
    names = {"uniform": group_of.get(compared["uniform"]), "top": group_of.get(compared["top"]),
             "base": _baseline(replicas)}
    u, top, base = selections.get(names["uniform"]), selections.get(names["top"]), selections[names["base"]]

    def tuned(key: str, kind: str = "visual"):
        return _tuned_hits(evals, replicas[names[key]], kind)

    def seeds(key: str) -> str:
        return f" (mean over {len(replicas[names[key]])} seeds)" if len(replicas[names[key]]) > 1 else ""

    if u:
        verdict, text = _judged(u["visual_retention"] >= 0.95, intervals.retention_interval, tuned("uniform"),
                                tuned("base"), threshold=0.95)
        out.append(("uniform 25% keeps >= 95% of the `all` visual score", verdict,
                    f"retention {fmt(u['visual_retention'])}{seeds('uniform')}{text}"))
        verdict, text = _judged(
            u["text_qa_accuracy"] >= base["text_qa_accuracy"],
            lambda a, b: intervals.difference_interval(a, b, intervals.accuracy),
            tuned("uniform", "text_qa"), tuned("base", "text_qa"), threshold=0.0)
        out.append(("uniform 25% text score >= the `all` run's", verdict,
                    f"text QA {fmt(u['text_qa_accuracy'])} vs {fmt(base['text_qa_accuracy'])}{seeds('uniform')}, "
                    f"difference{text}; of the base LM's text QA: {fmt(u.get('text_qa_vs_base_lm'))} vs "
                    f"{fmt(base.get('text_qa_vs_base_lm'))}; ppl {fmt(u['text_ppl'], 1)} vs {fmt(base['text_ppl'], 1)}"))
    if u and top:
        verdict, text = _judged(u["visual_score"] > top["visual_score"], intervals.difference_interval,
                                tuned("uniform"), tuned("top"), threshold=0.0, strict=True)
        out.append(("uniform beats contiguous top", verdict,
                    f"visual {fmt(u['visual_score'])} vs {fmt(top['visual_score'])}{seeds('uniform')}, difference{text}"))
    grouped = group_curves(curves, replicas)
    if names["uniform"] in grouped and names["base"] in grouped:
        protected, conventional = grouped[names["uniform"]], grouped[names["base"]]
        for healed in (False, True):
            prot, conv = curve_points(protected, healed), curve_points(conventional, healed)
            ks = [k for k in (1, 2, 3) if k in prot and k in conv]
            if not ks:
                continue
            judged = [_judged(prot[k]["visual_score"] > conv[k]["visual_score"], intervals.difference_interval,
                              _group_hits(prot[k]["replicas"]), _group_hits(conv[k]["replicas"]), threshold=0.0,
                              strict=True) for k in ks]
            claim = (f"after a healing tune, protected pruning beats conventional at {ks[0]}-{ks[-1]} removed layers"
                     if healed  # an extension (prune.curve.heal_steps), not one of the paper's claims
                     else f"protected pruning beats conventional pruning at {ks[0]}-{ks[-1]} removed layers")
            out.append((claim, intervals.combine([v for v, _ in judged]), "; ".join(
                f"k={k}: {fmt(prot[k]['visual_score'])} vs {fmt(conv[k]['visual_score'])}{text}"
                for k, (_, text) in zip(ks, judged))))
    return out


def curve_points(points: list[dict], healed: bool = False) -> dict[int, dict]:
    """removed layers -> the curve's scores there (`healed`: after the healing tune; k = 0, nothing cut, is the
    unhealed point); {} for `healed` when the curve has no healing."""
    if not healed:
        return {p["removed_layers"]: p for p in points}
    found = {p["removed_layers"]: p["healed"] for p in points if "healed" in p}
    return {0: points[0], **found} if found else {}


def healed_scores(points: list[dict]) -> dict[int, float]:
    """removed layers -> visual score after the healing tune (k = 0: nothing was cut, nothing to heal)."""
    return {k: p["visual_score"] for k, p in curve_points(points, healed=True).items()}


def error_bars(selections: dict[str, dict], sweep: list[dict], curves: dict[str, list[dict]], evals: dict[str, dict],
               replicas: dict[str, list[str]]) -> dict:
    """The figures' 95% intervals (pipeline/intervals.py), over seeds and evaluation samples: "sweep", per sweep row
    (of `selections`, group_rows) the interval of its visual retention against the baseline selection; "curves", per
    selection of `curves` (group_curves) and removed-layer count, the interval of its visual score (and, as
    "<selection>, healed", of its healed score). Missing where samples were not recorded."""
    base = _tuned_hits(evals, replicas[_baseline(replicas)])
    out: dict = {"sweep": {}, "curves": {}}
    for row in sweep:
        run = _tuned_hits(evals, replicas[next(g for g, r in selections.items() if r is row)])
        if run is not None and base is not None:
            out["sweep"][row["tuned_layers"]] = intervals.retention_interval(run, base)
    for group, points in curves.items():
        for point in points:
            hits = _group_hits(point["replicas"])
            if hits is not None:
                out["curves"].setdefault(group, {})[point["removed_layers"]] = intervals.score_interval(hits)
            healed = _group_hits(point.get("healed", {}).get("replicas", [None]))
            if healed is not None:
                out["curves"].setdefault(f"{group}, healed", {})[point["removed_layers"]] = intervals.score_interval(healed)
        if f"{group}, healed" in out["curves"] and 0 in out["curves"].get(group, {}):  # k = 0: nothing cut or healed
            out["curves"][f"{group}, healed"][0] = out["curves"][group][0]
    return out


def _yerr(values: list[float], bounds: list[tuple[float, float] | None]):
    """matplotlib's asymmetric yerr from intervals (0 where a point has none)."""
    low = [v - b[0] if b else 0.0 for v, b in zip(values, bounds)]
    high = [b[1] - v if b else 0.0 for v, b in zip(values, bounds)]
    return [[max(x, 0.0) for x in low], [max(x, 0.0) for x in high]]


PRETRAINING_LOSSES = ("vision_pretrain", "lm_pretrain", "projector")  # plots/loss/<name>.csv of the shared stages


def figures(curves: dict, sweep: list[dict], importance: dict[str, dict], out_dir: Path,
            losses: dict[str, list[tuple[int, float]]] | None = None, bars: dict | None = None) -> list[Path]:
    """The report's PNG figures, written into `out_dir`: retention against tuned layers (the sweep), the pruning
    curves (per selection: group_curves), each run's per-layer importance (`importance`: run -> its scores JSON) and
    the training losses (`losses`: plots/loss/<name>.csv as (step, loss) rows), with the 95% intervals of `bars`
    (error_bars) drawn as error bars. One series per selection, one scale per axis: they are also what `dvc plots
    show` renders (offline, unlike its vega charts). Returns their paths."""
    bars = bars or {"sweep": {}, "curves": {}}
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
        kept = [r["visual_retention"] for r in sweep]
        visual_ax.errorbar(xs, kept, yerr=_yerr(kept, [bars["sweep"].get(x) for x in xs]), fmt="o-", capsize=3)
        visual_ax.set(xlabel="tuned layers (uniform)", ylabel="visual score / `all` score", title="Visual retention")
        text_ax.plot(xs, [r["text_retention"] for r in sweep], "s--", color="tab:orange")
        text_ax.set(xlabel="tuned layers (uniform)", ylabel="text QA / `all` text QA", title="Text QA retention")
        for ax in (visual_ax, text_ax):
            ax.axhline(1.0, color="grey", lw=0.5)
        save(fig, "retention_vs_layers.png")
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, points in curves.items():
            ks, scores = [p["removed_layers"] for p in points], [p["visual_score"] for p in points]
            seeds = f", {len(points[0]['replicas'])} seeds" if len(points[0].get("replicas", [])) > 1 else ""
            drawn = ax.errorbar(ks, scores, yerr=_yerr(scores, [bars["curves"].get(name, {}).get(k) for k in ks]),
                                fmt="o-", capsize=3, label=f"{name} ({points[-1]['mode']}{seeds})")
            healed = healed_scores(points)
            if healed:
                bounds = [bars["curves"].get(f"{name}, healed", {}).get(k) for k in healed]
                ax.errorbar(list(healed), list(healed.values()), yerr=_yerr(list(healed.values()), bounds), fmt="s--",
                            capsize=3, color=drawn.lines[0].get_color(), label=f"{name}, healed")
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


def markdown(rows: dict, curves: dict, checks: list, figure_links: list[str],
             benchmarks: dict[str, dict] | None = None, seeds: dict[str, dict] | None = None) -> str:
    """The report. `figure_links`: the figures' paths relative to the report; `benchmarks`: kind (tuned, pruned) ->
    its benchmark_rows, a section for each that has any (none: the report has no benchmark section); `seeds`:
    seed_table, a section when there are seed replicas."""
    lines = [
        "# Layer-selection report", "",
        "Retention = score / the `all` run's score. Visual = mean exact-match accuracy over the question types "
        "(digits included); text = held-out text QA accuracy and perplexity; vs base LM = text QA / the base LM's "
        "before visual tuning (how much text ability the run kept), ppl × = perplexity / the base LM's; trainable = trainable parameters, "
        "× = / the `all` run's. Training times are not results (they differ between identical runs): each run's are "
        "in its run record (runs/) and in MLflow, and bench/train_bench.py measures the speed-up.", "",
        "| run | strategy | layers | visual | retention | text QA | text retention | vs base LM | text ppl | ppl × "
        "| trainable | trainable × | pruned visual | pruned retention |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['strategy']} | {','.join(map(str, r['layers']))} | {fmt(r['visual_score'])} | "
            f"{fmt(r['visual_retention'])} | {fmt(r['text_qa_accuracy'])} | {fmt(r['text_retention'])} | "
            f"{fmt(r['text_qa_vs_base_lm'])} | {fmt(r['text_ppl'], 1)} | {fmt(r['text_ppl_vs_base_lm'], 1)} | "
            f"{r['trainable_parameters']:,} | {fmt(r['trainable_ratio'], 2)} | "
            f"{fmt(r['pruned_visual_score'])} ({r['pruned_layers']} layers) | {fmt(r['pruned_visual_retention'])} |"
        )
    if seeds:
        def ranged(entry: dict, key: str) -> str:
            bounds = entry.get(f"{key}_interval")
            return fmt(entry[key]) + (f" [{fmt(bounds[0])}, {fmt(bounds[1])}]" if bounds else "")

        lines += ["", "## Selections over training seeds", "",
                  "Each selection's runs that differ only in `train_seed`: the mean over them, with its 95% interval "
                  "over seeds and evaluation samples (pipeline/intervals.py).", "",
                  "| selection | seeds | visual | retention | text QA | vs base LM | text ppl | pruned retention |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {len(e['seeds'])} | {ranged(e, 'visual_score')} | {ranged(e, 'visual_retention')} | "
                  f"{ranged(e, 'text_qa_accuracy')} | {fmt(e['text_qa_vs_base_lm'])} | {fmt(e['text_ppl'], 1)} | "
                  f"{fmt(e['pruned_visual_retention'])} |" for name, e in seeds.items()]
    types = sorted({t for r in rows.values() for t in r["per_type"]})
    lines += ["", "## Accuracy per question type", "", "| run | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    lines += [f"| {name} | " + " | ".join(fmt(r["per_type"].get(t)) for t in types) + " |" for name, r in rows.items()]
    for kind, table in (benchmarks or {}).items():
        if table:
            lines += ["", *benchmark_table(kind, table)]
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
        lines += [("Each comparison with its 95% paired bootstrap interval over the training seeds and the evaluation "
                   "samples: a claim holds or fails when the interval is on one side of its threshold, and is within "
                   "noise when it straddles it." if seeds else
                   "Each comparison with its 95% paired bootstrap interval over the evaluation samples: a claim holds or "
                   "fails when the interval is on one side of its threshold, and is within noise when it straddles it "
                   "(training noise, another seed, is not in these intervals)."), ""]
        lines += [f"- {verdict}: {claim} ({evidence})" for claim, verdict, evidence in checks]
    lines += ["", "## Figures", ""] + [f"![{Path(link).stem}]({link})" for link in figure_links]
    return "\n".join(lines) + "\n"


def benchmark_table(kind: str, table: dict[str, dict[str, dict]]) -> list[str]:
    """One benchmark_rows table as markdown lines: a row per score, a column per run, each cell `score (retention)`."""
    runs = list(next(iter(table.values())))
    lines = [f"## Published benchmarks ({kind} models)", "",
             f"Each cell: the {kind} model's score (its retention = score / the `all` run's tuned score). "
             "A score's name is what `registry.min_benchmark_retention` takes (docs/benchmarks.md).", "",
             "| benchmark | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for score_name, cells in table.items():
        lines.append(f"| {score_name} | " + " | ".join(
            f"{fmt(cells[run]['score'])} ({fmt(cells[run]['retention'])})" for run in runs) + " |")
    return lines


def retention_csv(sweep: list[dict]) -> str:
    """The sweep as DVC plot data."""
    return "tuned_layers,visual_retention,text_retention\n" + "".join(
        f"{r['tuned_layers']},{clean(r['visual_retention'])},{clean(r['text_retention'])}\n" for r in sweep)


def summary(rows: dict, checks: list, seeds: dict[str, dict] | None = None) -> dict:
    """The report's metrics: each run's numbers (NaN as null), each claim's verdict and, with seed replicas, each
    selection's means and intervals (seed_table) under "selections"."""
    out = {name: {k: clean(v) for k, v in r.items() if k not in ("per_type", "layers", "strategy")} for name, r in rows.items()}
    out["claims"] = {claim: verdict for claim, verdict, _ in checks}
    if seeds:
        out["selections"] = {name: {k: clean(v) for k, v in e.items()} for name, e in seeds.items()}
    return out
