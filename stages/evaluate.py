"""Stage `evaluate`: greedy-decoding metrics for one run's tuned and pruned models.

    python -m stages.evaluate --run uniform25
"""

import json
from pathlib import Path

from stages._common import load_params, run, run_name, torch_dtype


def evaluation_sets(params) -> dict:
    """The held-out sets every model is scored on, sized by `evaluate` params."""
    import datasets

    cfg = params.evaluate
    visual = datasets.load_from_disk("data/prepared/visual")
    qa = datasets.load_from_disk("data/prepared/text_qa")
    return {
        "vqa": [visual["vqa_test"][i] for i in range(min(cfg.vqa_samples, len(visual["vqa_test"])))],
        "digits": [visual["digits_test"][i] for i in range(min(cfg.digits_samples, len(visual["digits_test"])))],
        "text": list(datasets.load_from_disk("data/prepared/text")["test"]["text"])[: cfg.text_ppl_chunks],
        "text_qa": [qa[i] for i in range(min(cfg.text_qa_samples, len(qa)))],
    }


def evaluate_model(model, processor, params, sets: dict) -> dict:
    from pipeline import evaluation as E, model as M

    cfg = params.evaluate
    timing = E.GenerationTiming()
    vqa = E.visual_accuracy(model, processor, sets["vqa"], max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, timing=timing)
    digits = E.visual_accuracy(model, processor, sets["digits"], max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, timing=timing)
    tokenizer = processor.tokenizer
    ppl = E.text_perplexity(model, tokenizer, sets["text"], batch_size=cfg.batch_size, max_length=params.lm_pretrain.seq_len)
    text_qa = E.text_qa_accuracy(model, tokenizer, sets["text_qa"], max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    per_type = vqa["per_type"] | digits["per_type"]
    return {
        "visual_score": sum(per_type.values()) / len(per_type),  # mean over question types, digits included
        "vqa_accuracy": vqa["accuracy"],
        "digits_accuracy": digits["accuracy"],
        "per_type": per_type,
        "text_ppl": ppl,
        "text_qa_accuracy": text_qa["accuracy"],
        "num_decoder_layers": M.num_decoder_layers(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        **timing.as_metrics(),
        "examples": vqa["examples"][:5] + digits["examples"][:3],
    }


def main(argv: list[str]) -> None:
    name = run_name(argv, "stages.evaluate")

    from pipeline import model as M, tracking
    from pipeline.storage import atomic_write_json

    params = load_params()
    sets = evaluation_sets(params)
    results = {}
    for kind in ("tuned", "pruned"):
        model, processor = M.load_vlm(Path(f"models/{kind}/{name}"), dtype=torch_dtype(params.model.dtype))
        results[kind] = evaluate_model(model, processor, params, sets)
    tune_metrics = json.loads(Path(f"metrics/tune/{name}.json").read_text())
    results["tuned"] |= {k: tune_metrics[k] for k in ("train_seconds", "peak_memory_bytes", "trainable_parameters", "optimizer_state_bytes")}
    atomic_write_json(f"metrics/eval/{name}.json", results)

    selection = json.loads(Path(f"models/tuned/{name}/selection.json").read_text())
    mlflow = tracking.setup(params.mlflow.experiment)
    with mlflow.start_run(run_id=selection["mlflow_run_id"]):
        for kind, res in results.items():
            mlflow.log_metrics({f"{kind}_{k}": v for k, v in res.items() if isinstance(v, (int, float))})
            mlflow.log_metrics({f"{kind}_acc_{q}": v for q, v in res["per_type"].items()})
        mlflow.log_dict(results, "eval.json")


if __name__ == "__main__":
    run(main)
