"""Stage `pruning_curve`: the visual and text scores of each run in `prune.curve.runs` after removing 0..n layers,
ranked by the run's own importance scores (its prune stage wrote them). A selective run's tuned layers are
protected; the `all` run has no region, so it gets conventional pruning: the paper's comparison.

    python -m stages.pruning_curve
"""

import json
from pathlib import Path

from stages._common import load_params, run, torch_dtype
from stages.evaluate import evaluate_model, evaluation_sets


def main(argv: list[str]) -> None:
    from pipeline import model as M, pruning
    from pipeline.storage import atomic_write_json, atomic_write_text

    params = load_params()
    cfg = params.prune
    sets = evaluation_sets(params)
    curves, rows = {}, []
    for name in cfg.curve.runs:
        tuned = Path(f"models/tuned/{name}")
        scores = json.loads(Path(f"plots/importance/{name}.json").read_text())[cfg.metric]
        region = json.loads((tuned / "selection.json").read_text())["layers"]
        protected = [] if len(region) == len(scores) else region
        points = []
        for k in range(cfg.curve.max_layers + 1):
            if k > len(scores) - len(protected) - 1:
                break  # at least one unprotected layer stays
            removed = pruning.choose_layers_to_prune(scores, k, protected) if k else []
            model, processor = M.load_vlm(tuned, dtype=torch_dtype(params.model.dtype))
            if removed:
                pruning.remove_layers(model, removed, protected=protected)
            res = evaluate_model(model, processor, params, sets)
            point = {"removed_layers": k, "removed": removed, "mode": "protected" if protected else "conventional",
                     **{m: res[m] for m in ("visual_score", "text_qa_accuracy", "text_ppl")}}
            points.append(point)
            rows.append(f"{name},{k},{res['visual_score']},{res['text_qa_accuracy']},{res['text_ppl']}\n")
        curves[name] = points
    atomic_write_json("metrics/pruning_curve.json", curves)
    atomic_write_text("plots/pruning_curve.csv", "run,removed_layers,visual_score,text_qa_accuracy,text_ppl\n" + "".join(rows))


if __name__ == "__main__":
    run(main)
