"""Evaluation with greedy decoding: visual exact match per question type, text perplexity and text QA accuracy,
generation latency (`evaluate_model`: all of them, on the held-out sets of `evaluation_sets`). Retention = score /
the `all` baseline's score."""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import data, intervals
from pipeline.data.chat import processor_inputs


def normalise(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text.strip().lower()).strip()


def _generate(model: nn.Module, inputs: dict, max_new_tokens: int, tokenizer) -> tuple[list[str], int]:
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    new = out[:, inputs["input_ids"].shape[1] :]
    n_tokens = int((new != tokenizer.pad_token_id).sum())
    return tokenizer.batch_decode(new, skip_special_tokens=True), n_tokens


@dataclass
class GenerationTiming:
    seconds: float = 0.0
    samples: int = 0
    new_tokens: int = 0

    def as_metrics(self) -> dict[str, float]:
        return {
            "generation_ms_per_sample": 1000 * self.seconds / max(1, self.samples),
            "generation_tokens_per_s": self.new_tokens / self.seconds if self.seconds else 0.0,
        }


@torch.no_grad()
def visual_accuracy(model, processor, records, *, max_new_tokens: int, batch_size: int, timing: GenerationTiming) -> dict:
    """Exact-match accuracy (after lower-casing and stripping punctuation) of the answer to each record's first
    question, per question type and overall; text-only records are asked without an image."""
    model.eval()
    tokenizer = processor.tokenizer
    hits: dict[str, list[int]] = defaultdict(list)
    examples = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        inputs = processor_inputs(processor, batch, with_answers=False, padding_side="left")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        t0 = time.perf_counter()
        answers, n_new = _generate(model, inputs, max_new_tokens, tokenizer)
        timing.seconds += time.perf_counter() - t0
        timing.samples += len(batch)
        timing.new_tokens += n_new
        for r, pred in zip(batch, answers):
            gold = r["conversations"][1]["value"]
            hits[r["qtype"]].append(int(normalise(pred) == normalise(gold)))
            if len(examples) < 20:
                examples.append({"id": r["id"], "qtype": r["qtype"], "gold": gold, "pred": pred})
    per_type = {q: sum(v) / len(v) for q, v in sorted(hits.items())}
    n = sum(len(v) for v in hits.values())
    return {"per_type": per_type, "accuracy": sum(sum(v) for v in hits.values()) / max(1, n), "n": n, "examples": examples,
            "hits": {q: intervals.encode(v) for q, v in sorted(hits.items())}}


@torch.no_grad()
def text_perplexity(model, tokenizer, texts: list[str], *, batch_size: int, max_length: int) -> float:
    """exp(mean next-token NLL) over held-out text, language model only (no image)."""
    model.eval()
    tokenizer.padding_side = "right"
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        enc = enc.to(model.device)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
        labels = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
        total_nll += float(nll[mask].sum())
        total_tokens += int(mask.sum())
    return math.exp(total_nll / max(1, total_tokens))


@torch.no_grad()
def text_qa_accuracy(model, tokenizer, qa: list[dict], *, max_new_tokens: int, batch_size: int) -> dict:
    model.eval()
    tokenizer.padding_side = "left"
    hits: dict[str, list[int]] = defaultdict(list)
    for start in range(0, len(qa), batch_size):
        batch = qa[start : start + batch_size]
        inputs = tokenizer([data.text_qa_prompt(r["question"]) for r in batch], return_tensors="pt", padding=True).to(model.device)
        answers, _ = _generate(model, dict(inputs), max_new_tokens, tokenizer)
        for r, pred in zip(batch, answers):
            hits[r["qtype"]].append(int(normalise(pred) == normalise(r["answer"])))
    n = sum(len(v) for v in hits.values())
    return {
        "accuracy": sum(sum(v) for v in hits.values()) / max(1, n),
        "per_type": {q: sum(v) / len(v) for q, v in sorted(hits.items())},
        "n": n,
        "hits": {q: intervals.encode(v) for q, v in sorted(hits.items())},
    }


@torch.no_grad()
def image_to_caption_accuracy(model, dataset, collator, *, batch_size: int) -> float:
    """Zero-shot retrieval of a contrastive (CLIP/SigLIP) model: the share of images whose most similar caption,
    among all captions of `dataset`, is their own (or the same words: digits share captions)."""
    model.eval()
    rows = [dataset[i] for i in range(len(dataset))]
    images, texts = [], []
    for start in range(0, len(rows), batch_size):
        batch = collator(rows[start : start + batch_size])
        images.append(model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
        texts.append(model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output)
    img, txt = torch.cat(images), torch.cat(texts)
    best = (nn.functional.normalize(img, dim=-1) @ nn.functional.normalize(txt, dim=-1).T).argmax(dim=-1).tolist()
    captions = [r["caption"] for r in rows]
    return sum(captions[j] == captions[i] for i, j in enumerate(best)) / len(rows)


def evaluation_sets(visual, text, text_qa, cfg) -> dict:
    """The held-out sets every model is scored on, from the prepared datasets (data/prepared/visual, text, text_qa),
    sized by `cfg` (the `evaluate` params)."""
    return {
        "vqa": [visual["vqa_test"][i] for i in range(min(cfg.vqa_samples, len(visual["vqa_test"])))],
        "digits": [visual["digits_test"][i] for i in range(min(cfg.digits_samples, len(visual["digits_test"])))],
        "text": list(text["test"]["text"])[: cfg.text_ppl_chunks],
        "text_qa": [text_qa[i] for i in range(min(cfg.text_qa_samples, len(text_qa)))],
    }


def evaluate_model(model, processor, sets: dict, cfg, *, seq_len: int) -> dict:
    """Every score of one model on `sets` (`evaluation_sets`), with the `evaluate` params `cfg`; text perplexity over
    windows of `seq_len` tokens (lm_pretrain.seq_len)."""
    from pipeline.model import num_decoder_layers

    timing = GenerationTiming()
    vqa = visual_accuracy(model, processor, sets["vqa"], max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, timing=timing)
    digits = visual_accuracy(model, processor, sets["digits"], max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, timing=timing)
    tokenizer = processor.tokenizer
    ppl = text_perplexity(model, tokenizer, sets["text"], batch_size=cfg.batch_size, max_length=seq_len)
    text_qa = text_qa_accuracy(model, tokenizer, sets["text_qa"], max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    per_type = vqa["per_type"] | digits["per_type"]
    return {
        "visual_score": sum(per_type.values()) / len(per_type),  # mean over question types, digits included
        "vqa_accuracy": vqa["accuracy"],
        "digits_accuracy": digits["accuracy"],
        "per_type": per_type,
        "text_ppl": ppl,
        "text_qa_accuracy": text_qa["accuracy"],
        "num_decoder_layers": num_decoder_layers(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        **timing.as_metrics(),
        "examples": vqa["examples"][:5] + digits["examples"][:3],
        # which samples were answered right, per question type (pipeline/intervals.py: the report's intervals)
        "samples": {"visual": vqa["hits"] | digits["hits"], "text_qa": text_qa["hits"]},
    }


def retention(score: float, baseline: float) -> float:
    if baseline == 0 or math.isnan(baseline) or math.isnan(score):
        return float("nan")
    return score / baseline
