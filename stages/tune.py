"""Stage `tune` (LLaVA stage 2, the paper's subject): one run per layer-selection entry in `tune.runs`.

    python -m stages.tune --run uniform25
    torchrun --nproc_per_node 8 -m stages.tune --run uniform25      # or: accelerate launch -m stages.tune ...

Under a launcher every rank trains; rank 0 alone logs to MLflow and writes the outputs (docs/multi-gpu.md).
"""

import json
from contextlib import ExitStack
from pathlib import Path

from stages._common import load_params, run, run_name, torch_dtype


def resolve_layers(params, name: str, num_layers: int) -> list[int]:
    from pipeline.selection import select_layers

    spec = params.tune.run(name)
    scores = None
    if spec.strategy == "importance":
        path = Path(f"plots/importance/{spec.importance_from}.json")
        if not path.exists():
            raise FileNotFoundError(
                f"tune.importance_runs.{name}: importance scores {path} are missing (`dvc repro prune@{spec.importance_from}` writes them)"
            )
        scores = json.loads(path.read_text())[spec.importance_metric]
    try:
        return select_layers(num_layers, spec.strategy, spec.budget, seed=spec.seed, scores=scores)
    except ValueError as err:  # e.g. an explicit layer index past this model's depth (only known once it is loaded)
        group = "importance_runs" if name in params.tune.importance_runs else "runs"
        raise ValueError(f"tune.{group}.{name}: {err}") from None


def main(argv: list[str]) -> None:
    name = run_name(argv, "stages.tune")

    import datasets

    from pipeline import distributed as D, model as M, tracking, training as T
    from pipeline.storage import atomic_write_json, atomic_write_text
    from pipeline.tuning import Trainability

    params = load_params()
    spec, cfg = params.tune.run(name), params.tune
    out, ckpt = Path(f"models/tuned/{name}"), Path(f"checkpoints/tune/{name}")
    main_rank = D.is_main()  # True without a launcher

    # The key hashes all of data/prepared: only rank 0 needs it (MLflow, and the checkpoint fingerprint it checks).
    key = tracking.pipeline_key(params) if main_rank else {"git_commit": "", "data_hash": ""}
    dtype = torch_dtype(params.model.dtype)
    model, processor = M.load_vlm("models/projector", dtype=dtype)
    layers = resolve_layers(params, name, M.num_decoder_layers(model))
    trainability = Trainability(
        projector=spec.projector, language_model=spec.language_model, layers=tuple(layers),
        embeddings=cfg.embeddings, lm_head=cfg.lm_head, lora=cfg.lora,
    )
    data = datasets.load_from_disk("data/prepared/visual")["instruct_train"]
    run_params = {
        "run": name, "strategy": spec.strategy if isinstance(spec.strategy, str) else "explicit",
        "budget": spec.budget, "layers": ",".join(map(str, layers)), "num_layers": len(layers),
        "language_model": spec.language_model, "projector": spec.projector, "projector_lr": cfg.projector_lr,
        "lm_lr": cfg.lm_lr, "seed": params.seed, "selection_seed": spec.seed,
        "importance_metric": spec.importance_metric or "", "importance_from": spec.importance_from or "", "max_steps": cfg.train.max_steps,
        "batch_size": cfg.train.batch_size, "lora": json.dumps(cfg.lora.__dict__) if spec.language_model == "lora" else "",
        "git_commit": key["git_commit"], "data_hash": key["data_hash"],
        "processes": D.world_size(),  # batch_size is per process
    }

    # The outputs are written last, once the MLflow run has ended: a failure before (training, or the tracking
    # server going away) leaves none of them, and the run FAILED (or, if the server is gone, RUNNING until the
    # re-run's `end_stale_runs` sets it to KILLED).
    with ExitStack() as tracked:
        if main_rank:
            mlflow = tracking.setup(params.mlflow.experiment)
            parent = tracking.parent_run_id(mlflow, key)
            tracked.enter_context(mlflow.start_run(run_id=parent))
            tracking.end_stale_runs(mlflow, parent, kind="tune", run=name)
            mlrun = tracked.enter_context(
                mlflow.start_run(run_name=name, nested=True, tags=tracking.run_tags("tune", name))
            )
            mlflow.log_params(tracking.scrub(run_params))
        tuned, result, report = T.train_visual(
            model, processor, data, trainability=trainability, projector_lr=cfg.projector_lr, lm_lr=cfg.lm_lr,
            params=cfg.train, ckpt_dir=ckpt, seed=params.seed,
            fingerprint={"stage": "tune", "run": run_params, "train": cfg.train.model_dump()},
            reload=lambda: M.load_vlm("models/projector", dtype=dtype)[0],
            data_name="data/prepared/visual, split 'instruct_train'", params_key="tune.train",
        )
        if main_rank:
            for h in result.loss_history:
                mlflow.log_metric("train_loss", h["loss"], step=h["step"])
            metrics = {
                "steps": result.steps, "train_seconds": result.train_seconds, "final_loss": result.final_loss,
                "peak_memory_bytes": result.peak_memory_bytes, "trainable_parameters": report["trainable"],
                "trainable_fraction": report["trainable_fraction"], "optimizer_state_bytes": report["optimizer_state_bytes"],
                "truncated_samples": report["truncated_samples"],
            }
            mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None})  # truncated: None when lazy
            selection = {"run": name, "layers": layers, "num_decoder_layers": M.num_decoder_layers(tuned),
                         "mlflow_run_id": mlrun.info.run_id, **{k: v for k, v in run_params.items() if k != "layers"}}
            mlflow.log_dict(report, "trainability.json")
            mlflow.log_dict(selection, "selection.json")
    if main_rank:
        M.save_vlm(tuned, processor, out, extra_json={"selection.json": selection, "trainability.json": report})
        T.finish(ckpt)
        atomic_write_text(f"plots/loss/{name}.csv", T.loss_csv(result.loss_history))
        atomic_write_json(f"metrics/tune/{name}.json", metrics)
    D.shutdown()  # the other ranks wait here for rank 0's outputs, then every process leaves the group


if __name__ == "__main__":
    run(main, launchable="stages.tune")
