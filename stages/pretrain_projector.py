"""Stage `pretrain_projector` (LLaVA stage 1): vision tower and LLM frozen, only the projector learns, on captions.

    python -m stages.pretrain_projector
    torchrun --nproc_per_node 8 -m stages.pretrain_projector   # rank 0 alone writes the outputs (docs/multi-gpu.md)
"""

from stages import _inputs as inputs, _paths as paths
from stages._launch import run_launchable


def main(argv: list[str]) -> None:
    from pipeline import data, distributed, model, training
    from pipeline.storage import atomic_write_json, atomic_write_text
    from pipeline.tuning import Trainability

    params = inputs.load_params()
    cfg = params.pretrain_projector
    dtype = inputs.torch_dtype(params.model.dtype)
    base = inputs.need(paths.BASE, "build_base")
    ckpt = paths.CHECKPOINTS / "pretrain_projector"
    vlm, processor = model.load_vlm(base, dtype=dtype)
    captions = inputs.prepared(data.VISUAL_DIR)["caption_train"]
    vlm, result, report = training.train_visual(
        vlm, processor, captions,
        trainability=Trainability(projector="full", language_model="frozen"),
        projector_lr=cfg.lr, lm_lr=cfg.lr, params=cfg.train, ckpt_dir=ckpt, seed=params.seed,
        fingerprint={"stage": "pretrain_projector", "params": cfg.model_dump(), "n": len(captions)},
        reload=lambda: model.load_vlm(base, dtype=dtype)[0],
        data_name=f"{paths.PREPARED / data.VISUAL_DIR}, split 'caption_train'", params_key="pretrain_projector.train",
    )
    if not distributed.is_main():  # under a launcher: rank 0 writes the outputs while this rank waits
        distributed.shutdown()
        return
    model.save_vlm(vlm, processor, paths.PROJECTOR)
    training.finish(ckpt)
    atomic_write_text(paths.loss_plot("projector"), training.loss_csv(result.loss_history))
    atomic_write_json(paths.stage_metrics("projector"), {
        "steps": result.steps, "train_seconds": result.train_seconds, "final_loss": result.final_loss,
        "trainable_parameters": report["trainable"], "peak_memory_bytes": result.peak_memory_bytes,
    })
    distributed.shutdown()


if __name__ == "__main__":
    run_launchable(main, "stages.pretrain_projector")
