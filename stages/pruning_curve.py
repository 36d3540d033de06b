"""Stage `pruning_curve`: the visual and text scores of each run in `prune.curve.runs` after removing 0..n layers,
ranked by the run's own importance scores (its prune stage wrote them): region-protected for selective runs,
conventional for `all` (pipeline/pruning_curve.py). With `prune.curve.heal_steps`, each cut model is also healed by a
short tune of the run's own trainable set and scored again.

    python -m stages.pruning_curve
"""

from stages import _inputs as inputs, _paths as paths
from stages._common import run


def main(argv: list[str]) -> None:
    from pipeline import data, evaluation, model
    from pipeline.pruning_curve import Healing, curve_csv, pruning_curve
    from pipeline.storage import atomic_write_json, atomic_write_text

    params = inputs.load_params()
    cfg, dtype = params.prune, inputs.torch_dtype(params.model.dtype)
    visual = inputs.prepared(data.VISUAL_DIR)
    sets = evaluation.evaluation_sets(visual, inputs.prepared(data.TEXT_DIR), inputs.prepared(data.TEXT_QA_DIR),
                                      params.evaluate)
    curves = {}
    for name in cfg.curve.runs:
        tune_stage, prune_stage = inputs.stage_name(params, "tune", name), inputs.stage_name(params, "prune", name)
        tuned = inputs.need(paths.tuned_model(name), tune_stage)
        scores = inputs.read_json(paths.importance_scores(name), prune_stage, (cfg.metric,))[cfg.metric]
        region = inputs.read_json(paths.selection(name), tune_stage, ("layers",))["layers"]
        healing = None
        if cfg.curve.heal_steps:
            healing = Healing(
                run=params.tune.run(name), tune=params.tune, steps=cfg.curve.heal_steps,
                seed=params.tune.run(name).training_seed(params.seed),
                data=visual["instruct_train"], data_name=f"{paths.PREPARED / data.VISUAL_DIR}, split 'instruct_train'",
                ckpt_dir=paths.CHECKPOINTS / "heal",
            )
        curves[name] = pruning_curve(
            name, scores, region, max_layers=cfg.curve.max_layers, healing=healing,
            load_model=lambda: model.load_vlm(tuned, dtype=dtype),
            evaluate=lambda vlm, processor: evaluation.evaluate_model(vlm, processor, sets, params.evaluate,
                                                                      seq_len=params.lm_pretrain.seq_len),
        )
    atomic_write_json(paths.CURVE_METRICS, curves)
    atomic_write_text(paths.CURVE_PLOT, curve_csv(curves))


if __name__ == "__main__":
    run(main)
