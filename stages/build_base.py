"""Stage `build_base`: the model every later stage starts from.

tiny/micro: train a tokenizer, build a seeded vision tower and Llama LM from configs, pretrain the tower
contrastively on image-text pairs (as CLIP was; vision_pretrain), pretrain the LM on the text corpus (so there is
text ability to preserve), and compose the LLaVA (pipeline/pretraining.py). hf: compose from the given vision encoder
and LM, or take an existing LLaVA checkpoint.
"""

import shutil

from stages import _inputs as inputs, _paths as paths, _records as records
from stages._common import run

PARTS = paths.CHECKPOINTS / "base_parts"  # the offline profiles' tower and LM before they are composed


def offline_parts(params) -> tuple[dict, str, str]:
    """tiny/micro: the pretrained vision tower and LM, written under PARTS; returns (metrics, vision dir, LM dir)."""
    from transformers import AutoTokenizer

    from pipeline import data, model, pretraining, training
    from pipeline.storage import atomic_write_text

    text = inputs.prepared(data.TEXT_DIR)
    texts_train, texts_test = list(text["train"]["text"]), list(text["test"]["text"])
    qa = list(inputs.prepared(data.TEXT_QA_DIR))
    vision_dir, lm_dir = model.build_offline_parts(params.model.profile_spec(), texts_train, PARTS, seed=params.seed)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    metrics, vision_loss = {}, []
    if params.vision_pretrain.train.max_steps:
        pairs = inputs.prepared(data.VISUAL_DIR)[data.VISION_PAIRS_SPLIT]
        metrics, vision_loss = pretraining.pretrain_vision(params, vision_dir, tokenizer, pairs,
                                                           paths.CHECKPOINTS / "vision_pretrain")
    atomic_write_text(paths.loss_plot("vision_pretrain"), training.loss_csv(vision_loss))
    lm_metrics, lm_loss = {}, []
    if params.lm_pretrain.train.max_steps:  # 0: the LM stays random (benchmarks that time only the data path)
        lm_metrics, lm_loss = pretraining.pretrain_lm(params, lm_dir, tokenizer, texts_train, texts_test, qa,
                                                      paths.CHECKPOINTS / "lm_pretrain")
    atomic_write_text(paths.loss_plot("lm_pretrain"), training.loss_csv(lm_loss))
    return metrics | lm_metrics, str(vision_dir), str(lm_dir)


def main(argv: list[str]) -> None:
    from pipeline import model
    from pipeline.data.chat import set_chat_template
    from pipeline.storage import atomic_write_json

    params = inputs.load_params()
    dtype = inputs.torch_dtype(params.model.dtype)
    metrics: dict = {"profile": params.model.profile}
    chat_template, remote_code = params.model.conversation_format(), params.model.trust_remote_code
    if params.model.profile == "hf" and params.model.checkpoint:
        vlm, processor = model.load_vlm(params.model.checkpoint, dtype=dtype, trust_remote_code=remote_code)
        set_chat_template(processor.tokenizer, chat_template)
    elif params.model.profile == "hf":
        vlm, processor = model.compose_llava(params.model.vision, params.model.language_model, dtype=dtype,
                                             trust_remote_code=remote_code, chat_template=chat_template)
    else:
        offline_metrics, vision_dir, lm_dir = offline_parts(params)
        metrics |= offline_metrics
        vlm, processor = model.compose_llava(vision_dir, lm_dir, dtype=dtype, chat_template=chat_template)
    metrics["decoder_layers"] = model.num_decoder_layers(vlm)
    metrics["parameters"] = sum(p.numel() for p in vlm.parameters())
    model.save_vlm(vlm, processor, paths.BASE)
    shutil.rmtree(PARTS, ignore_errors=True)
    results, record = records.split(metrics)  # the pretraining times: runs/build_base.json
    atomic_write_json(paths.stage_metrics("base"), results)
    records.write(record, "build_base", describes=(paths.stage_metrics("base"),))


if __name__ == "__main__":
    run(main)
