"""Stage `pretrain_projector` (LLaVA stage 1): vision tower and LLM frozen, only the projector learns, on captions.

    python -m stages.pretrain_projector
    torchrun --nproc_per_node 8 -m stages.pretrain_projector   # rank 0 alone writes the outputs (docs/multi-gpu.md)
"""

from contextlib import ExitStack

from stages import _inputs as inputs, _paths as paths, _records as records
from stages._launch import run_launchable


def main(argv: list[str]) -> None:
    from pipeline import data, distributed, model, storage, training
    from pipeline.tuning import Trainability

    params = inputs.load_params()
    cfg = params.pretrain_projector
    dtype = inputs.torch_dtype(params.model.dtype)
    ckpt, metrics_path, plot_path = paths.CHECKPOINTS / "pretrain_projector", paths.stage_metrics("projector"), \
        paths.loss_plot("projector")
    main_rank = distributed.is_main()
    with ExitStack() as held:
        if main_rank:  # one writer of the projector and its checkpoints: a second process fails at once
            held.enter_context(storage.exclusive_lock(paths.output_lock("pretrain_projector"), "stage pretrain_projector"))
        base = inputs.need(paths.BASE, "build_base")
        vlm, processor = model.load_vlm(base, dtype=dtype)
        captions = inputs.prepared(data.VISUAL_DIR)["caption_train"]
        data_name, key = f"{paths.PREPARED / data.VISUAL_DIR}, split 'caption_train'", "pretrain_projector.train"
        samples = training.prepare_visual(captions, processor, cfg.train, data_name=data_name, params_key=key)
        if main_rank:  # the previous metrics go first: none outlives its model
            for stale in (metrics_path, plot_path):
                storage.remove_output(stale)
        vlm, result, report = training.train_visual(
            vlm, processor, captions,
            trainability=Trainability(projector="full", language_model="frozen"),
            projector_lr=cfg.lr, lm_lr=cfg.lr, params=cfg.train, ckpt_dir=ckpt, seed=params.seed,
            fingerprint={"stage": "pretrain_projector", "params": cfg.model_dump(), "n": len(captions)},
            reload=lambda: model.load_vlm(base, dtype=dtype)[0], data_name=data_name, params_key=key, prepared=samples,
        )
        if main_rank:  # under a launcher: rank 0 writes the outputs while the other ranks wait (shutdown)
            metrics = {"steps": result.steps, "train_seconds": result.train_seconds, "final_loss": result.final_loss,
                       "trainable_parameters": report["trainable"], "peak_memory_bytes": result.peak_memory_bytes}
            results, record = records.split(metrics)  # the timings: runs/pretrain_projector.json
            storage.write_together({
                paths.PROJECTOR: lambda: model.save_vlm(vlm, processor, paths.PROJECTOR),
                plot_path: lambda: storage.atomic_write_text(plot_path, training.loss_csv(result.loss_history)),
                metrics_path: lambda: storage.atomic_write_json(metrics_path, results),
            })
            records.write(record, "pretrain_projector", describes=(metrics_path,))
            training.finish(ckpt)
    distributed.shutdown()


if __name__ == "__main__":
    run_launchable(main, "stages.pretrain_projector")
