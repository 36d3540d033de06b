"""Stage `prune`: score the layers of a tuned model on visual calibration data and remove the `prune.num_layers`
least important ones outside its visual region (the tuned layers). The `all` run has no region to protect, so it
gets conventional angular-distance pruning: the paper's comparison.

    python -m stages.prune --run uniform25
"""

from stages import _inputs as inputs, _paths as paths
from stages._common import run, run_name


def main(argv: list[str]) -> None:
    name = run_name(argv, "stages.prune")

    from safetensors.torch import load_file

    from pipeline import data, importance, model, pruning
    from pipeline.config import ParamsError
    from pipeline.storage import atomic_write_json, atomic_write_text

    params = inputs.load_params()
    params.tune.run(name)  # a bad --run fails here, before any loading
    cfg = params.prune
    tune_stage = inputs.stage_name(params, "tune", name)
    tuned_dir = inputs.need(paths.tuned_model(name), tune_stage)
    region = inputs.read_json(paths.selection(name), tune_stage, ("layers",))["layers"]
    vlm, processor = model.load_vlm(tuned_dir, dtype=inputs.torch_dtype(params.model.dtype))
    num_layers = model.num_decoder_layers(vlm)
    protected = [] if len(region) == num_layers else region
    try:  # before scoring (minutes on a real model): can this many layers go, given the run's region?
        pruning.choose_layers_to_prune([0.0] * num_layers, cfg.num_layers, protected)
    except ValueError as err:
        raise ParamsError(f"prune.num_layers={cfg.num_layers} for run {name!r}: {err}") from None

    visual_dir = paths.PREPARED / data.VISUAL_DIR
    instruct = inputs.prepared(data.VISUAL_DIR)["instruct_train"]
    calib = importance.calibration_sample(instruct, cfg.calibration_samples, seed=params.seed,
                                          source=f"{visual_dir}, split 'instruct_train'")
    base_state = {}
    for f in sorted(inputs.need(paths.PROJECTOR, "pretrain_projector").glob("*.safetensors")):
        base_state |= load_file(f)
    batches = importance.calibration_batches(processor, calib, cfg.batch_size)
    scores = importance.layer_importance(vlm, batches, base=base_state)

    remove = pruning.choose_layers_to_prune(scores.get(cfg.metric), cfg.num_layers, protected)
    kept = pruning.remove_layers(vlm, remove, protected=protected)
    meta = {"run": name, "metric": cfg.metric, "protected": protected, "mode": "protected" if protected else "conventional"}
    pruning.export_pruned(vlm, processor, paths.pruned_model(name), removed=remove, kept=kept, meta=meta)

    atomic_write_json(paths.importance_scores(name), scores.to_dict())
    rows = scores.to_rows()
    header = list(rows[0])
    atomic_write_text(paths.importance_plot(name), ",".join(header) + "\n" + "".join(
        ",".join("" if r[h] is None else str(r[h]) for h in header) + "\n" for r in rows))
    atomic_write_json(paths.stage_metrics("prune", name), {
        "removed": remove, "kept": kept, "num_layers_before": num_layers, "num_layers_after": len(kept), **meta,
    })


if __name__ == "__main__":
    run(main)
