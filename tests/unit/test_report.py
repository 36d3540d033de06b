"""pipeline/report.py and pipeline/pruning_curve.py without a pipeline run: the committed report of the tiny default
rebuilt from the committed metrics byte for byte, the claims' runs picked from params by what they are, and the
pruning curve's plot data. (The full stages run in test_pipeline_e2e.py.)"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import config, report
from pipeline.pruning_curve import curve_csv
from pipeline.selection import select_layers

REPO = Path(__file__).resolve().parents[2]


def committed_rows(params):
    runs = params.tune.all_runs()
    evals = {name: json.loads((REPO / "metrics/eval" / f"{name}.json").read_text()) for name in runs}
    depth = json.loads((REPO / "metrics/base.json").read_text())["decoder_layers"]
    layers = {name: select_layers(depth, spec.strategy, spec.budget, seed=spec.seed) for name, spec in runs.items()}
    base_lm = json.loads((REPO / "metrics/base.json").read_text())
    return runs, report.run_rows(runs, evals, layers, base_lm), evals


def test_the_committed_report_is_rebuilt_byte_for_byte():
    params = config.load(REPO / "params.yaml")
    runs, rows, evals = committed_rows(params)
    curves = json.loads((REPO / "metrics/pruning_curve.json").read_text())
    sweep = report.sweep_rows(rows, runs)
    checks = report.claims(rows, curves, report.claim_runs(runs), evals)
    links = [f"figures/{p.name}" for p in sorted((REPO / "reports/figures").glob("*.png"))]
    assert report.markdown(rows, curves, checks, links) == (REPO / "reports/summary.md").read_text()
    summary = json.dumps(report.summary(rows, checks), indent=2, sort_keys=True) + "\n"  # storage.atomic_write_json
    assert summary == (REPO / "metrics/summary.json").read_text()
    assert report.retention_csv(sweep) == (REPO / "plots/retention_vs_layers.csv").read_text()


def test_claims_compare_the_runs_params_define_not_fixed_names():
    raw = {"tune": {"runs": {"all": {"strategy": "all"}, "even": {"strategy": "uniform", "budget": 0.25},
                             "block": {"strategy": "top", "budget": 0.25}, "half": {"strategy": "uniform", "budget": 0.5}}}}
    runs = config.validate(raw).tune.all_runs()
    assert report.claim_runs(runs) == {"uniform": "even", "top": "block"}
    score = {"visual_score": 0.5, "visual_retention": 1.0, "text_qa_accuracy": 0.5, "text_ppl": 10.0}
    rows = {"all": score, "even": score | {"visual_score": 0.6}, "block": score, "half": score}
    curve = [{"removed_layers": k, "visual_score": 0.5} for k in range(3)]
    checks = report.claims(rows, {"all": curve, "even": curve}, report.claim_runs(runs))
    # without per-sample hits: verdicts from the point estimates, said so
    assert [verdict for _, verdict, _ in checks] == ["holds", "holds", "holds", "fails"]  # the last: 0.5 is not > 0.5
    assert "visual 0.600 vs 0.500, difference (no interval: samples not recorded)" in checks[2][2]
    no_uniform = {name: spec for name, spec in runs.items() if name != "even"}
    assert report.claim_runs(no_uniform) == {"uniform": None, "top": "block"}
    assert report.claims(rows, {"all": curve}, report.claim_runs(no_uniform)) == []


def test_curve_csv_has_a_healed_score_only_where_a_cut_was_healed():
    points = [{"removed_layers": 0, "visual_score": 0.9, "text_qa_accuracy": 0.1, "text_ppl": 20.0},
              {"removed_layers": 1, "visual_score": 0.8, "text_qa_accuracy": 0.1, "text_ppl": 25.0,
               "healed": {"visual_score": 0.85}}]
    assert curve_csv({"all": points}) == ("run,removed_layers,visual_score,text_qa_accuracy,text_ppl,healed_visual_score\n"
                                          "all,0,0.9,0.1,20.0,\nall,1,0.8,0.1,25.0,0.85\n")


def test_claims_read_their_verdicts_from_paired_intervals():
    raw = {"tune": {"runs": {"all": {"strategy": "all"}, "even": {"strategy": "uniform", "budget": 0.25},
                             "block": {"strategy": "top", "budget": 0.25}}}}
    runs = config.validate(raw).tune.all_runs()

    def evaluated(visual: str, text: str) -> dict:
        return {"tuned": {"samples": {"visual": {"colour": visual}, "text_qa": {"fact": text}}}}

    base_visual = "1" * 80 + "0" * 20
    evals = {"all": evaluated(base_visual, "1" * 10 + "0" * 90),
             "even": evaluated("0" * 2 + base_visual[2:], "1" * 40 + "0" * 60),  # 2 of 80 lost; text far better
             "block": evaluated("1" * 40 + "0" * 60, "1" * 10 + "0" * 90)}  # far worse visually
    score = lambda v, t: {"visual_score": v.count("1") / 100, "text_qa_accuracy": t, "text_ppl": 1.0}
    rows = {"all": score(base_visual, 0.1) | {"visual_retention": 1.0},
            "even": score("0" * 2 + base_visual[2:], 0.4) | {"visual_retention": 78 / 80},
            "block": score("1" * 40, 0.1) | {"visual_retention": 0.5}}
    checks = {claim: (verdict, evidence) for claim, verdict, evidence in
              report.claims(rows, {}, report.claim_runs(runs), evals)}
    retained = checks["uniform 25% keeps >= 95% of the `all` visual score"]
    assert retained[0] == "within noise" and "[95% interval" in retained[1]  # 0.975, but 2 answers could be chance
    assert checks["uniform 25% text score >= the `all` run's"][0] == "holds"
    assert checks["uniform beats contiguous top"][0] == "holds"


# ---------------------------------------------------------------------------------------------------- benchmarks
def test_without_benchmark_scores_the_report_is_unchanged():
    """The stage passes both kinds' benchmark tables; the tiny default runs no benchmark, so they are empty and the
    committed report comes out byte for byte (no benchmark section)."""
    params = config.load(REPO / "params.yaml")
    runs, rows, evals = committed_rows(params)
    tables = {kind: report.benchmark_rows(evals, kind) for kind in ("tuned", "pruned")}
    assert tables == {"tuned": {}, "pruned": {}}
    curves = json.loads((REPO / "metrics/pruning_curve.json").read_text())
    checks = report.claims(rows, curves, report.claim_runs(runs), evals)
    links = [f"figures/{p.name}" for p in sorted((REPO / "reports/figures").glob("*.png"))]
    assert report.markdown(rows, curves, checks, links, tables) == (REPO / "reports/summary.md").read_text()


def bench_evals() -> dict:
    """Three runs' eval metrics with benchmark scores: `even` lacks MME, `all`'s pruned model ran no benchmark."""
    return {
        "all": {"tuned": {"benchmarks": {"visual_average": 0.5, "pope_random": {"accuracy": 0.8, "f1": 0.75},
                                         "mmlu": {"acc": 0.4}, "mme": {"perception": 1000.0}}},
                "pruned": {}},
        "even": {"tuned": {"benchmarks": {"pope_random": {"accuracy": 0.72, "f1": 0.6}, "mmlu": {"acc": 0.5},
                                          "visual_average": 0.45}},
                 "pruned": {"benchmarks": {"mmlu": {"acc": 0.2}}}},
        "block": {"tuned": {"benchmarks": {"mmlu": {"acc": None}, "mme": {"perception": 500.0}, "gqa": {"exact_match": 0.3}}},
                  "pruned": {"benchmarks": {}}},
    }


def test_benchmark_rows_give_each_score_and_its_retention_against_all():
    table = report.benchmark_rows(bench_evals())
    # every score of any run, the average first, then in the order they were first seen
    assert list(table) == ["visual_average", "pope_random.accuracy", "pope_random.f1", "mmlu.acc", "mme.perception",
                           "gqa.exact_match"]
    assert list(table["mmlu.acc"]) == ["all", "even", "block"]
    assert table["visual_average"]["even"] == {"score": 0.45, "retention": 0.45 / 0.5}
    assert table["pope_random.f1"]["even"] == {"score": 0.6, "retention": 0.6 / 0.75}
    assert table["mmlu.acc"]["all"] == {"score": 0.4, "retention": 1.0}
    assert table["mmlu.acc"]["even"]["retention"] == 0.5 / 0.4
    assert table["mme.perception"]["block"] == {"score": 500.0, "retention": 0.5}
    assert table["mme.perception"]["even"] == {"score": None, "retention": None}  # not run
    assert table["mmlu.acc"]["block"] == {"score": None, "retention": None}  # not a number
    assert table["gqa.exact_match"]["block"] == {"score": 0.3, "retention": None}  # `all` has no GQA score
    pruned = report.benchmark_rows(bench_evals(), "pruned")  # against the `all` run's *tuned* score
    assert list(pruned) == ["mmlu.acc"] and pruned["mmlu.acc"]["even"] == {"score": 0.2, "retention": 0.2 / 0.4}
    assert pruned["mmlu.acc"]["all"] == {"score": None, "retention": None}


def test_benchmark_tables_are_a_report_section_per_kind():
    params = config.load(REPO / "params.yaml")
    runs, rows, evals = committed_rows(params)
    tables = {kind: report.benchmark_rows(bench_evals(), kind) for kind in ("tuned", "pruned")}
    text = report.markdown(rows, {}, [], [], tables)
    tuned = text.split("## Published benchmarks (tuned models)\n")[1].split("\n## ")[0]
    table = [line for line in tuned.splitlines() if line.startswith("|")]
    assert table[0] == "| benchmark | all | even | block |" and table[1] == "|---|---|---|---|"
    assert table[2] == "| visual_average | 0.500 (1.000) | 0.450 (0.900) | n/a (n/a) |"
    assert table[5] == "| mmlu.acc | 0.400 (1.000) | 0.500 (1.250) | n/a (n/a) |"
    assert table[6] == "| mme.perception | 1000.000 (1.000) | n/a (n/a) | 500.000 (0.500) |"
    assert len(table) == 2 + 6
    pruned = text.split("## Published benchmarks (pruned models)\n")[1].split("\n## ")[0]
    assert "| mmlu.acc | n/a (n/a) | 0.200 (0.500) | n/a (n/a) |" in pruned
    assert text.index("## Accuracy per question type") < text.index("## Published benchmarks (tuned models)")
    only_tuned = report.markdown(rows, {}, [], [], {"tuned": tables["tuned"], "pruned": {}})
    assert "(pruned models)" not in only_tuned and "(tuned models)" in only_tuned


# ------------------------------------------------------------------------------------------------ seed replicas
def seeded_runs():
    raw = {"tune": {"runs": {"all": {"strategy": "all"}, "all-seed1": {"strategy": "all", "train_seed": 1},
                             "even": {"strategy": "uniform", "budget": 0.25},
                             "even-seed1": {"strategy": "uniform", "budget": 0.25, "train_seed": 1},
                             "block": {"strategy": "top", "budget": 0.25}}}}
    params = config.validate(raw)
    return params.tune.all_runs(), params.tune.replicas(params.seed)


def evaluated(visual: str, text: str = "1" * 10 + "0" * 90) -> dict:
    tuned = {"visual_score": visual.count("1") / len(visual), "text_qa_accuracy": text.count("1") / len(text),
             "text_ppl": 10.0, "trainable_parameters": 1, "per_type": {"colour": 0.5},
             "samples": {"visual": {"colour": visual}, "text_qa": {"fact": text}}}
    return {"tuned": tuned, "pruned": {"visual_score": 0.5, "num_decoder_layers": 2}}


def test_replicas_are_the_runs_that_differ_only_in_their_training_seed():
    runs, replicas = seeded_runs()
    assert replicas == {"all": ["all", "all-seed1"], "even": ["even", "even-seed1"], "block": ["block"]}
    twin = {"tune": {"runs": {"all": {"strategy": "all"}, "all-again": {"strategy": "all", "train_seed": 0}}}}
    with __import__("pytest").raises(config.ParamsError, match=r"\['all', 'all-again'\] are the same selection"):
        config.validate(twin)


def test_a_claim_that_one_seed_passes_is_within_noise_over_two_seeds():
    """Seed 0 of `even` answers as the baseline does: alone, its retention is 1 with no doubt. Seed 1 keeps 80 of the
    baseline's 100 right answers: over both seeds the mean retention is 0.9 and its interval, which draws the seeds,
    reaches across 0.95."""
    runs, replicas = seeded_runs()
    base = "1" * 100 + "0" * 20
    evals = {"all": evaluated(base), "all-seed1": evaluated(base), "even": evaluated(base),
             "even-seed1": evaluated("0" * 20 + base[20:]), "block": evaluated("1" * 50 + "0" * 70)}
    layers = {name: [0] for name in runs}
    rows = report.run_rows(runs, evals, layers)
    claim = "uniform 25% keeps >= 95% of the `all` visual score"
    alone = {c: v for c, v, _ in report.claims(rows, {}, report.claim_runs(runs), evals)}
    assert alone[claim] == "holds"  # seed 0 only
    both = {c: (v, e) for c, v, e in report.claims(rows, {}, report.claim_runs(runs), evals, replicas)}
    verdict, evidence = both[claim]
    assert verdict == "within noise" and "retention 0.900 (mean over 2 seeds)" in evidence
    selections = report.group_rows(rows, replicas)
    assert selections["even"]["seeds"] == ["even", "even-seed1"] and selections["block"]["visual_score"] == 50 / 120
    table = report.seed_table(selections, evals, replicas)
    low, high = table["even"]["visual_retention_interval"]
    assert low < 0.95 < high and table["all"]["visual_retention"] == 1.0
    text = report.markdown(rows, {}, [], [], seeds=table)
    assert "## Selections over training seeds" in text and "| even | 2 | 0.750 [" in text
    assert report.summary(rows, [], table)["selections"]["even"]["seeds"] == ["even", "even-seed1"]


def test_pruning_curves_of_replicas_are_averaged_and_drawn_with_their_intervals(tmp_path):
    runs, replicas = seeded_runs()
    def point(k, visual, healed=None):
        p = {"removed_layers": k, "mode": "protected", "visual_score": visual.count("1") / 100,
             "samples": {"visual": {"colour": visual}}}
        return p | ({"healed": {"visual_score": healed.count("1") / 100, "samples": {"visual": {"colour": healed}}}}
                    if healed else {})
    curves = {"even": [point(0, "1" * 90 + "0" * 10), point(1, "1" * 60 + "0" * 40, "1" * 70 + "0" * 30)],
              "even-seed1": [point(0, "1" * 80 + "0" * 20), point(1, "1" * 40 + "0" * 60, "1" * 50 + "0" * 50),
                             point(2, "0" * 100)]}
    grouped = report.group_curves(curves, replicas)
    assert list(grouped) == ["even"] and [p["removed_layers"] for p in grouped["even"]] == [0, 1]  # k both reached
    assert grouped["even"][1]["visual_score"] == 0.5 and grouped["even"][1]["healed"]["visual_score"] == 0.6
    bars = report.error_bars({}, [], grouped, {}, replicas)
    low, high = bars["curves"]["even"][1]
    assert low < 0.5 < high and bars["curves"]["even, healed"][0] == bars["curves"]["even"][0]
    written = report.figures(grouped, [], {}, tmp_path, bars=bars)
    assert [p.name for p in written] == ["pruning_curves.png"] and written[0].stat().st_size > 0
