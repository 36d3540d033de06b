"""Stage `tune` (LLaVA stage 2, the paper's subject): one run per layer-selection entry in `tune.runs`.

    python -m stages.tune --run uniform25
    torchrun --nproc_per_node 8 -m stages.tune --run uniform25      # or: accelerate launch -m stages.tune ...

Under a launcher every rank trains; rank 0 alone logs to MLflow and writes the outputs (docs/multi-gpu.md).
"""

from contextlib import ExitStack

from pipeline.tracking import outage
from stages import _inputs as inputs, _paths as paths, _records as records
from stages._common import run_name
from stages._launch import run_launchable


def main(argv: list[str]) -> None:
    name = run_name(argv, "stages.tune")

    from pipeline import data, distributed, model, storage, tracking, training, tune_run

    params = inputs.load_params()
    spec, cfg = params.tune.run(name), params.tune
    out, ckpt = paths.tuned_model(name), paths.CHECKPOINTS / "tune" / name
    metrics_path, plot_path = paths.stage_metrics("tune", name), paths.loss_plot(name)
    main_rank = distributed.is_main()  # True without a launcher
    with ExitStack() as held:
        if main_rank:  # one writer of this run's outputs and checkpoints: a second process fails at once
            held.enter_context(storage.exclusive_lock(paths.output_lock("tune", name), f"tune run {name!r}"))
        scores = None
        if spec.strategy == "importance":  # the top-scored layers of another run (its prune stage scored them)
            path, metric = paths.importance_scores(spec.importance_from), spec.importance_metric
            scores = inputs.read_json(path, inputs.stage_name(params, "prune", spec.importance_from), (metric,))[metric]
        # The key hashes all of data/prepared: only rank 0 needs it (MLflow, and the checkpoint fingerprint).
        key = tracking.pipeline_key(params) if main_rank else {"git_commit": "", "data_hash": ""}
        dtype = inputs.torch_dtype(params.model.dtype)
        projector = inputs.need(paths.PROJECTOR, "pretrain_projector")
        vlm, processor = model.load_vlm(projector, dtype=dtype)
        layers = tune_run.resolve_layers(params.tune, name, model.num_decoder_layers(vlm), scores)
        data_name = f"{paths.PREPARED / data.VISUAL_DIR}, split 'instruct_train'"
        visual = inputs.prepared(data.VISUAL_DIR)["instruct_train"]
        # Refused here, before the MLflow run or any output: a run that could learn nothing (training.prepare_visual).
        samples = training.prepare_visual(visual, processor, cfg.train, data_name=data_name, params_key="tune.train")
        logged = tune_run.run_params(params, name, layers, key, processes=distributed.world_size())
        # Inside the MLflow run: training, the record, then the outputs (all or none: storage.write_together). Any
        # failure ends the run FAILED with its reason; the previous metrics are gone first, so none outlives its model.
        if main_rank:
            for stale in (metrics_path, plot_path):
                storage.remove_output(stale)
            mlflow = tracking.setup(params.mlflow.experiment)
            mlrun = held.enter_context(tune_run.mlflow_run(mlflow, key, name, logged))
        tuned, result, report = training.train_visual(
            vlm, processor, visual, trainability=tune_run.trainability(cfg, spec, layers), projector_lr=cfg.projector_lr,
            lm_lr=cfg.lm_lr, params=cfg.train, ckpt_dir=ckpt, seed=spec.training_seed(params.seed),
            fingerprint={"stage": "tune", "run": logged, "train": cfg.train.model_dump()},
            reload=lambda: model.load_vlm(projector, dtype=dtype)[0], data_name=data_name, params_key="tune.train",
            prepared=samples,
        )
        if main_rank:
            metrics = tune_run.metrics(result, report, mlflow_run_id=mlrun.info.run_id, git_commit=key["git_commit"])
            selection = tune_run.selection(name, layers, model.num_decoder_layers(tuned), logged)
            tune_run.log_result(mlflow, result, metrics, report, selection)
            side_files = {paths.selection(name).name: selection, "trainability.json": report}
            results, record = records.split(metrics)  # the timings and the run's identity: runs/tune/<run>.json
            storage.write_together({
                out: lambda: model.save_vlm(tuned, processor, out, extra_json=side_files),
                plot_path: lambda: storage.atomic_write_text(plot_path, training.loss_csv(result.loss_history)),
                metrics_path: lambda: storage.atomic_write_json(metrics_path, results),
            })
            records.write(record, "tune", name, describes=(metrics_path, paths.selection(name)))
    if main_rank:
        training.finish(ckpt)  # the checkpoints go once the model is written and its MLflow run ended FINISHED
    distributed.shutdown()  # the other ranks wait here for rank 0's outputs, then every process leaves the group


if __name__ == "__main__":
    run_launchable(main, "stages.tune", outage=outage)
