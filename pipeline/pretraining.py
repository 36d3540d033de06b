"""The tiny and micro profiles' base model parts, built offline (stage `build_base`): a tokenizer trained on the text
corpus, a seeded vision tower and Llama LM from configs (pipeline.model.build_offline_parts); the tower pretrained
contrastively on image-text pairs, as CLIP was (`vision_pretrain`), and the LM on the text corpus, so that there is
text ability to preserve (`lm_pretrain`)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import evaluation, importance, model, training
from pipeline.errors import ProjectError


class DepthProfileError(ProjectError):
    """The pretrained LM's Block Influence is concentrated in few layers, past lm_pretrain.min_bi_median_to_max."""


def pretrain_vision(params, vision_dir: Path, tokenizer, pairs, ckpt_dir: Path) -> tuple[dict, list[dict]]:
    """Contrastive pretraining of the tower saved in `vision_dir` (saved back there) on the image-text `pairs`, with a
    small text encoder that is then dropped. `params`: the validated params (vision_pretrain, evaluate, seed).
    Returns (metrics, the loss history)."""
    from transformers import AutoImageProcessor, AutoModel

    cfg = params.vision_pretrain
    tower = AutoModel.from_pretrained(vision_dir)
    image_processor = AutoImageProcessor.from_pretrained(vision_dir)
    contrastive, end_id = model.contrastive_model(tower, tokenizer, text_layers=cfg.text_layers,
                                                  max_length=cfg.train.max_length)
    pairs = pairs.shuffle(seed=params.seed, keep_in_memory=True)  # in memory: no cache file beside the prepared data
    data = training.image_text_dataset(pairs, image_processor)
    held_out, train = data.select(range(cfg.eval_pairs)), data.select(range(cfg.eval_pairs, len(data)))
    collator = training.ImageTextCollator(tokenizer, end_id, cfg.train.max_length)

    def retrieval() -> float:
        return evaluation.image_to_caption_accuracy(contrastive, held_out, collator, batch_size=params.evaluate.batch_size)

    before = retrieval()
    contrastive.requires_grad_(True)
    optimizer = torch.optim.AdamW(contrastive.parameters(), lr=cfg.lr, weight_decay=cfg.train.weight_decay)
    result = training.train(
        contrastive, train, collator=collator, optimizer=optimizer, params=cfg.train, ckpt_dir=ckpt_dir, seed=params.seed,
        fingerprint={"stage": "vision_pretrain", "params": cfg.model_dump(), "spec": str(params.model.profile_spec()),
                     "data": len(train)},
    )
    after = retrieval()
    model.save_vision_encoder(tower.eval(), image_processor, vision_dir)
    training.finish(ckpt_dir)
    return {
        "vision_retrieval_untrained": before, "vision_retrieval_pretrained": after,
        "vision_pretrain_steps": result.steps, "vision_pretrain_seconds": result.train_seconds,
        "vision_final_loss": result.final_loss,
    }, result.loss_history


def pretrain_lm(params, lm_dir: Path, tokenizer, texts_train: list[str], texts_test: list[str], qa: list[dict],
                ckpt_dir: Path) -> tuple[dict, list[dict]]:
    """Causal-LM pretraining of the LM saved in `lm_dir` (saved back there) on `texts_train`, scored by perplexity
    on `texts_test` and by accuracy on the text `qa`. `params`: the validated params (lm_pretrain, evaluate, seed).
    Returns (metrics, the loss history)."""
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(lm_dir)
    cfg = params.lm_pretrain
    ppl_args = dict(batch_size=params.evaluate.batch_size, max_length=cfg.seq_len)
    test = texts_test[: params.evaluate.text_ppl_chunks]
    before = evaluation.text_perplexity(lm, tokenizer, test, **ppl_args)
    blocks = training.text_blocks(texts_train, tokenizer, cfg.seq_len)
    lm.requires_grad_(True)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, weight_decay=cfg.train.weight_decay)
    result = training.train(
        lm, blocks, collator=None, optimizer=optimizer, params=cfg.train, ckpt_dir=ckpt_dir, seed=params.seed,
        fingerprint={"stage": "lm_pretrain", "params": cfg.model_dump(), "spec": str(params.model.profile_spec()),
                     "data": len(blocks)},
    )
    after = evaluation.text_perplexity(lm, tokenizer, test, **ppl_args)
    qa_acc = evaluation.text_qa_accuracy(lm, tokenizer, qa, max_new_tokens=params.evaluate.max_new_tokens,
                                         batch_size=params.evaluate.batch_size)
    # The depth profile before any visual tuning: BI per layer on the held-out text, and how it is spread.
    bi = importance.text_block_influence(lm, tokenizer, test, **ppl_args)
    spread = importance.influence_spread(bi)
    gate = cfg.min_bi_median_to_max
    if gate is not None and not spread["median_to_max"] >= gate:
        top = max(range(len(bi)), key=lambda i: bi[i])
        raise DepthProfileError(
            f"lm_pretrain.min_bi_median_to_max {gate}: the pretrained LM's median decoder layer has "
            f"{spread['median_to_max']:.3f} of the Block Influence of its layer {top} ({bi[top]:.3f}; effective layers "
            f"{spread['effective_layers']:.2f} of {len(bi)}): its depth is not used as the gate asks; pretrain it "
            f"longer or change its shape")
    model.save_language_model(lm, tokenizer, lm_dir)
    training.finish(ckpt_dir)
    return {
        "lm_ppl_untrained": before, "lm_ppl_pretrained": after, "lm_text_qa_accuracy": qa_acc["accuracy"],
        "lm_pretrain_steps": result.steps, "lm_pretrain_seconds": result.train_seconds, "lm_final_loss": result.final_loss,
        "lm_block_influence": bi, "lm_bi_median_to_max": spread["median_to_max"], "lm_bi_top_share": spread["top_share"],
        "lm_bi_effective_layers": spread["effective_layers"],
    }, result.loss_history
