"""Stage `prune`: score the layers of a tuned model on visual calibration data and remove the `prune.num_layers`
least important ones outside its visual region (the tuned layers). The `all` run has no region to protect, so it
gets conventional angular-distance pruning: the paper's comparison.

    python -m stages.prune --run uniform25
"""

import json
from pathlib import Path

from stages._common import load_params, run, run_name, torch_dtype


def main(argv: list[str]) -> None:
    name = run_name(argv, "stages.prune")

    import datasets
    from safetensors.torch import load_file

    from pipeline import importance, model as M, pruning
    from pipeline.storage import atomic_write_json, atomic_write_text

    params = load_params()
    cfg = params.prune
    tuned_dir = Path(f"models/tuned/{name}")
    if not tuned_dir.exists():
        raise FileNotFoundError(f"tuned model {tuned_dir} does not exist: run `dvc repro tune@{name}` first")
    selection = json.loads((tuned_dir / "selection.json").read_text())
    model, processor = M.load_vlm(tuned_dir, dtype=torch_dtype(params.model.dtype))
    num_layers = M.num_decoder_layers(model)
    region = selection["layers"]
    protected = [] if len(region) == num_layers else region
    try:  # before scoring (minutes on a real model): can this many layers go, given the run's region?
        pruning.choose_layers_to_prune([0.0] * num_layers, cfg.num_layers, protected)
    except ValueError as err:
        raise ValueError(f"prune.num_layers={cfg.num_layers} for run {name!r}: {err}") from None

    instruct = datasets.load_from_disk("data/prepared/visual")["instruct_train"]
    calib = importance.calibration_sample(instruct, cfg.calibration_samples, seed=params.seed,
                                          source="data/prepared/visual, split 'instruct_train'")
    base_state = {}
    for f in sorted(Path("models/projector").glob("*.safetensors")):
        base_state |= load_file(f)
    batches = importance.calibration_batches(processor, calib, cfg.batch_size)
    scores = importance.layer_importance(model, batches, base=base_state)

    remove = pruning.choose_layers_to_prune(scores.get(cfg.metric), cfg.num_layers, protected)
    kept = pruning.remove_layers(model, remove, protected=protected)
    meta = {"run": name, "metric": cfg.metric, "protected": protected, "mode": "protected" if protected else "conventional"}
    pruning.export_pruned(model, processor, f"models/pruned/{name}", removed=remove, kept=kept, meta=meta)

    atomic_write_json(f"plots/importance/{name}.json", scores.to_dict())
    rows = scores.to_rows()
    header = list(rows[0])
    atomic_write_text(f"plots/importance/{name}.csv", ",".join(header) + "\n" + "".join(
        ",".join("" if r[h] is None else str(r[h]) for h in header) + "\n" for r in rows))
    atomic_write_json(f"metrics/prune/{name}.json", {
        "removed": remove, "kept": kept, "num_layers_before": num_layers, "num_layers_after": len(kept), **meta,
    })


if __name__ == "__main__":
    run(main)
