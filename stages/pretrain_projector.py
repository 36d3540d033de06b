"""Stage `pretrain_projector` (LLaVA stage 1): vision tower and LLM frozen, only the projector learns, on captions.

    python -m stages.pretrain_projector
    torchrun --nproc_per_node 8 -m stages.pretrain_projector   # rank 0 alone writes the outputs (docs/multi-gpu.md)
"""

from pathlib import Path

from stages._common import load_params, run, torch_dtype

OUT = Path("models/projector")
CKPT = Path("checkpoints/pretrain_projector")


def main(argv: list[str]) -> None:
    import datasets

    from pipeline import distributed as D, model as M, training as T
    from pipeline.storage import atomic_write_json, atomic_write_text
    from pipeline.tuning import Trainability

    params = load_params()
    cfg = params.pretrain_projector
    dtype = torch_dtype(params.model.dtype)
    model, processor = M.load_vlm("models/base", dtype=dtype)
    captions = datasets.load_from_disk("data/prepared/visual")["caption_train"]
    model, result, report = T.train_visual(
        model, processor, captions,
        trainability=Trainability(projector="full", language_model="frozen"),
        projector_lr=cfg.lr, lm_lr=cfg.lr, params=cfg.train, ckpt_dir=CKPT, seed=params.seed,
        fingerprint={"stage": "pretrain_projector", "params": cfg.model_dump(), "n": len(captions)},
        reload=lambda: M.load_vlm("models/base", dtype=dtype)[0],
        data_name="data/prepared/visual, split 'caption_train'", params_key="pretrain_projector.train",
    )
    if not D.is_main():  # under a launcher: rank 0 writes the outputs while this rank waits
        D.shutdown()
        return
    M.save_vlm(model, processor, OUT)
    T.finish(CKPT)
    atomic_write_text("plots/loss/projector.csv", T.loss_csv(result.loss_history))
    atomic_write_json("metrics/projector.json", {
        "steps": result.steps, "train_seconds": result.train_seconds, "final_loss": result.final_loss,
        "trainable_parameters": report["trainable"], "peak_memory_bytes": result.peak_memory_bytes,
    })
    D.shutdown()


if __name__ == "__main__":
    run(main, launchable="stages.pretrain_projector")
