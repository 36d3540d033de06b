"""Stage `tune` (LLaVA stage 2, the paper's subject): one run per layer-selection entry in `tune.runs`.

    python -m stages.tune --run uniform25
    torchrun --nproc_per_node 8 -m stages.tune --run uniform25      # or: accelerate launch -m stages.tune ...

Under a launcher every rank trains; rank 0 alone logs to MLflow and writes the outputs (docs/multi-gpu.md).
"""

from contextlib import ExitStack

from pipeline.tracking import outage
from stages import _inputs as inputs, _paths as paths
from stages._common import run_name
from stages._launch import run_launchable


def main(argv: list[str]) -> None:
    name = run_name(argv, "stages.tune")

    from pipeline import data, distributed, model, tracking, training, tune_run
    from pipeline.storage import atomic_write_json, atomic_write_text

    params = inputs.load_params()
    spec, cfg = params.tune.run(name), params.tune
    out, ckpt = paths.tuned_model(name), paths.CHECKPOINTS / "tune" / name
    main_rank = distributed.is_main()  # True without a launcher
    scores = None
    if spec.strategy == "importance":  # the top-scored layers of another run (its prune stage scored them)
        path, metric = paths.importance_scores(spec.importance_from), spec.importance_metric
        scores = inputs.read_json(path, inputs.stage_name(params, "prune", spec.importance_from), (metric,))[metric]

    # The key hashes all of data/prepared: only rank 0 needs it (MLflow, and the checkpoint fingerprint it checks).
    key = tracking.pipeline_key(params) if main_rank else {"git_commit": "", "data_hash": ""}
    dtype = inputs.torch_dtype(params.model.dtype)
    projector = inputs.need(paths.PROJECTOR, "pretrain_projector")
    vlm, processor = model.load_vlm(projector, dtype=dtype)
    layers = tune_run.resolve_layers(params.tune, name, model.num_decoder_layers(vlm), scores)
    visual = inputs.prepared(data.VISUAL_DIR)["instruct_train"]
    logged = tune_run.run_params(params, name, layers, key, processes=distributed.world_size())

    # The outputs are written last, once the MLflow run has ended: a failure before (training, or the tracking
    # server going away) leaves none of them, and the run FAILED (or, if the server is gone, RUNNING until the
    # re-run's `end_stale_runs` sets it to KILLED).
    with ExitStack() as tracked:
        if main_rank:
            mlflow = tracking.setup(params.mlflow.experiment)
            mlrun = tracked.enter_context(tune_run.mlflow_run(mlflow, key, name, logged))
        tuned, result, report = training.train_visual(
            vlm, processor, visual, trainability=tune_run.trainability(cfg, spec, layers), projector_lr=cfg.projector_lr,
            lm_lr=cfg.lm_lr, params=cfg.train, ckpt_dir=ckpt, seed=params.seed,
            fingerprint={"stage": "tune", "run": logged, "train": cfg.train.model_dump()},
            reload=lambda: model.load_vlm(projector, dtype=dtype)[0],
            data_name=f"{paths.PREPARED / data.VISUAL_DIR}, split 'instruct_train'", params_key="tune.train",
        )
        if main_rank:
            metrics = tune_run.metrics(result, report)
            selection = tune_run.selection(name, layers, model.num_decoder_layers(tuned), mlrun.info.run_id, logged)
            tune_run.log_result(mlflow, result, metrics, report, selection)
    if main_rank:
        side_files = {paths.selection(name).name: selection, "trainability.json": report}
        model.save_vlm(tuned, processor, out, extra_json=side_files)
        training.finish(ckpt)
        atomic_write_text(paths.loss_plot(name), training.loss_csv(result.loss_history))
        atomic_write_json(paths.stage_metrics("tune", name), metrics)
    distributed.shutdown()  # the other ranks wait here for rank 0's outputs, then every process leaves the group


if __name__ == "__main__":
    run_launchable(main, "stages.tune", outage=outage)
