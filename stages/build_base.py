"""Stage `build_base`: the model every later stage starts from.

tiny/micro: train a tokenizer, build a seeded vision tower and Llama LM from configs, pretrain the tower
contrastively on image-text pairs (as CLIP was; vision_pretrain), pretrain the LM on the text corpus (so there is
text ability to preserve), and compose the LLaVA. hf: compose from the given vision encoder and
LM, or take an existing LLaVA checkpoint.
"""

import shutil
from pathlib import Path

from stages._common import load_params, run, torch_dtype

OUT = Path("models/base")
PARTS = Path("checkpoints/base_parts")


def pretrain_tiny_vision(params, vision_dir: Path, tokenizer) -> dict:
    import datasets
    import torch
    from transformers import AutoImageProcessor, AutoModel

    from pipeline import data as D, evaluation as E, model as M, training as T
    from pipeline.storage import atomic_write_text

    cfg = params.vision_pretrain
    tower = AutoModel.from_pretrained(vision_dir)
    image_processor = AutoImageProcessor.from_pretrained(vision_dir)
    model, end_id = M.contrastive_model(tower, tokenizer, text_layers=cfg.text_layers, max_length=cfg.train.max_length)
    pairs = datasets.load_from_disk(f"data/prepared/{D.VISUAL_DIR}")[D.VISION_PAIRS_SPLIT]
    pairs = pairs.shuffle(seed=params.seed, keep_in_memory=True)  # in memory: no cache file inside data/prepared
    data = T.image_text_dataset(pairs, image_processor)
    held_out, train = data.select(range(cfg.eval_pairs)), data.select(range(cfg.eval_pairs, len(data)))
    collator = T.ImageTextCollator(tokenizer, end_id, cfg.train.max_length)
    retrieval = lambda: E.image_to_caption_accuracy(model, held_out, collator, batch_size=params.evaluate.batch_size)  # noqa: E731
    before = retrieval()
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.train.weight_decay)
    ckpt = Path("checkpoints/vision_pretrain")
    result = T.train(
        model, train, collator=collator, optimizer=optimizer, params=cfg.train, ckpt_dir=ckpt, seed=params.seed,
        fingerprint={"stage": "vision_pretrain", "params": cfg.model_dump(), "spec": str(params.model.profile_spec()),
                     "data": len(train)},
    )
    after = retrieval()
    M.save_vision_encoder(tower.eval(), image_processor, vision_dir)
    T.finish(ckpt)
    atomic_write_text("plots/loss/vision_pretrain.csv", T.loss_csv(result.loss_history))
    return {
        "vision_retrieval_untrained": before, "vision_retrieval_pretrained": after,
        "vision_pretrain_steps": result.steps, "vision_pretrain_seconds": result.train_seconds,
        "vision_final_loss": result.final_loss,
    }


def pretrain_tiny_lm(params, texts_train, texts_test, qa) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pipeline import evaluation as E, model as M, training as T
    from pipeline.storage import atomic_write_text

    spec = params.model.profile_spec()
    vision_dir, lm_dir = M.build_offline_parts(spec, texts_train, PARTS, seed=params.seed)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    if params.vision_pretrain.train.max_steps:
        vision_metrics = pretrain_tiny_vision(params, vision_dir, tokenizer)
    else:
        vision_metrics = {}
        atomic_write_text("plots/loss/vision_pretrain.csv", T.loss_csv([]))
    lm = LlamaForCausalLM.from_pretrained(lm_dir)
    cfg = params.lm_pretrain
    ppl_args = dict(batch_size=params.evaluate.batch_size, max_length=cfg.seq_len)
    test = texts_test[: params.evaluate.text_ppl_chunks]
    before = E.text_perplexity(lm, tokenizer, test, **ppl_args)
    blocks = T.text_blocks(texts_train, tokenizer, cfg.seq_len)
    lm.requires_grad_(True)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, weight_decay=cfg.train.weight_decay)
    result = T.train(
        lm, blocks, collator=None, optimizer=optimizer, params=cfg.train, ckpt_dir=Path("checkpoints/lm_pretrain"),
        seed=params.seed, fingerprint={"stage": "lm_pretrain", "params": cfg.model_dump(), "spec": str(spec), "data": len(blocks)},
    )
    after = E.text_perplexity(lm, tokenizer, test, **ppl_args)
    qa_acc = E.text_qa_accuracy(lm, tokenizer, qa, max_new_tokens=params.evaluate.max_new_tokens, batch_size=params.evaluate.batch_size)
    M.save_language_model(lm, tokenizer, lm_dir)
    T.finish(Path("checkpoints/lm_pretrain"))
    atomic_write_text("plots/loss/lm_pretrain.csv", T.loss_csv(result.loss_history))
    return vision_metrics | {
        "lm_ppl_untrained": before, "lm_ppl_pretrained": after, "lm_text_qa_accuracy": qa_acc["accuracy"],
        "lm_pretrain_steps": result.steps, "lm_pretrain_seconds": result.train_seconds, "lm_final_loss": result.final_loss,
        "vision_dir": str(vision_dir), "lm_dir": str(lm_dir),
    }


def main(argv: list[str]) -> None:
    import datasets

    from pipeline import data as D, model as M
    from pipeline.data.chat import set_chat_template
    from pipeline.storage import atomic_write_json

    params = load_params()
    dtype = torch_dtype(params.model.dtype)
    metrics: dict = {"profile": params.model.profile}
    if params.model.profile == "hf":
        if params.model.checkpoint:
            model, processor = M.load_vlm(params.model.checkpoint, dtype=dtype, trust_remote_code=params.model.trust_remote_code)
            set_chat_template(processor.tokenizer, params.model.conversation_format())
        else:
            model, processor = M.compose_llava(
                params.model.vision, params.model.language_model, dtype=dtype,
                trust_remote_code=params.model.trust_remote_code, chat_template=params.model.conversation_format(),
            )
    else:
        text = datasets.load_from_disk(f"data/prepared/{D.TEXT_DIR}")
        qa = list(datasets.load_from_disk(f"data/prepared/{D.TEXT_QA_DIR}"))
        metrics |= pretrain_tiny_lm(params, list(text["train"]["text"]), list(text["test"]["text"]), qa)
        model, processor = M.compose_llava(metrics.pop("vision_dir"), metrics.pop("lm_dir"), dtype=dtype,
                                           chat_template=params.model.conversation_format())
    metrics["decoder_layers"] = M.num_decoder_layers(model)
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    M.save_vlm(model, processor, OUT)
    shutil.rmtree(PARTS, ignore_errors=True)
    atomic_write_json("metrics/base.json", metrics)


if __name__ == "__main__":
    run(main)
