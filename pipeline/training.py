"""Training on the transformers Trainer: supervised visual instruction data (loss on answer tokens only), text
pretraining for the tiny LM, checkpoints for resume, a loss history for plots."""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import nn

from pipeline import model as M
from pipeline.config import TrainParams
from pipeline.data import DataError

log = logging.getLogger(__name__)
IGNORE = -100


# --------------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------------
def encode_conversation(
    tokenizer, conversations: list[dict], *, n_image_tokens: int, max_length: int, on_overflow: str, record_id: str
) -> tuple[list[int], list[int], bool]:
    """Token ids and labels (answer tokens only) for one LLaVA-format conversation; `<image>` is expanded to the
    vision tower's number of patch tokens. Returns (input_ids, labels, truncated)."""
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [IGNORE] * len(ids)
    turns = list(conversations)
    if len(turns) % 2 or not turns:
        raise DataError(f"record {record_id}: field 'conversations' must alternate human/gpt turns, got {len(turns)} turns")
    for k in range(0, len(turns), 2):
        human, gpt = turns[k], turns[k + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise DataError(f"record {record_id}: field 'conversations' turn {k} must be human then gpt")
        question = human["value"].replace(M.IMAGE_TOKEN, M.IMAGE_TOKEN * n_image_tokens)
        prompt = tokenizer(M.prompt_text(question), add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + gpt["value"].strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
    truncated = len(ids) > max_length
    if truncated:
        if on_overflow == "refuse":
            raise DataError(f"record {record_id}: {len(ids)} tokens exceed max_length {max_length} (on_overflow: refuse)")
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels, truncated


def encode_visual_dataset(ds: datasets.Dataset, processor, *, max_length: int, on_overflow: str) -> tuple[datasets.Dataset, int]:
    """Tokenise and preprocess images once, before training (kept in memory: nothing is written beside the data).
    Returns (dataset with input_ids/labels/pixel_values, number of truncated samples)."""
    n_image = M.num_image_tokens(processor)
    if max_length <= n_image + 8:
        raise ValueError(f"max_length {max_length} leaves no room for text after {n_image} image tokens")
    tokenizer = processor.tokenizer
    size = processor.image_processor.crop_size or processor.image_processor.size
    placeholder_shape = (3, size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge")))

    def encode(batch):
        out = {"input_ids": [], "labels": [], "truncated": []}
        for rid, conv in zip(batch["id"], batch["conversations"]):
            ids, labels, cut = encode_conversation(
                tokenizer, conv, n_image_tokens=n_image, max_length=max_length, on_overflow=on_overflow, record_id=rid
            )
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["truncated"].append(cut)
        # Text-only records (e.g. ShareGPT turns in LLaVA-665K) get a zero placeholder and has_image=False.
        images = [im.convert("RGB") for im in batch["image"] if im is not None]
        pixels = iter(processor.image_processor(images, return_tensors="np")["pixel_values"] if images else [])
        out["pixel_values"], out["has_image"] = [], []
        for im in batch["image"]:
            out["has_image"].append(im is not None)
            out["pixel_values"].append(next(pixels) if im is not None else None)
        shape = next((p.shape for p in out["pixel_values"] if p is not None), None) or placeholder_shape
        out["pixel_values"] = [p if p is not None else np.zeros(shape, dtype=np.float32) for p in out["pixel_values"]]
        return out

    encoded = ds.map(encode, batched=True, batch_size=256, remove_columns=ds.column_names, keep_in_memory=True)
    truncated = int(sum(encoded["truncated"]))
    if truncated:
        log.warning("%d of %d samples were longer than max_length %d and were truncated", truncated, len(ds), max_length)
    encoded = encoded.remove_columns("truncated").with_format("torch")
    return encoded, truncated


@dataclass
class VisualCollator:
    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = b["input_ids"], b["labels"], 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        with_image = [b["pixel_values"] for b in batch if b["has_image"]]
        if with_image:  # LLaVA matches image features to <image> tokens in order, so text-only rows need none
            out["pixel_values"] = torch.stack(with_image).float()
        return out


def text_blocks(texts: list[str], tokenizer, seq_len: int) -> datasets.Dataset:
    """Concatenate documents (EOS between them) and cut into fixed-length blocks for causal LM pretraining."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"text corpus has {len(stream)} tokens: fewer than one block of seq_len {seq_len}")
    blocks = [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks}).with_format("torch")


# --------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    steps: int
    train_seconds: float
    peak_memory_bytes: int
    loss_history: list[dict] = field(default_factory=list)
    final_loss: float = float("nan")


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _prepare_checkpoint_dir(ckpt_dir: Path, fingerprint: dict) -> bool:
    """Keep checkpoints only if they were written for the same run configuration; returns True to resume."""
    stamp = ckpt_dir / "fingerprint.json"
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
    if ckpt_dir.exists():
        same = stamp.exists() and json.loads(stamp.read_text()).get("digest") == digest
        if same and any(ckpt_dir.glob("checkpoint-*")):
            return True
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True)
    stamp.write_text(json.dumps({"digest": digest, "fingerprint": fingerprint}, default=str))
    return False


def train(
    model: nn.Module,
    dataset: datasets.Dataset,
    *,
    collator,
    optimizer: torch.optim.Optimizer,
    params: TrainParams,
    ckpt_dir: Path,
    seed: int,
    fingerprint: dict,
) -> TrainResult:
    """Run the transformers Trainer with our optimizer (trainable parameters only), resuming from the latest
    checkpoint in `ckpt_dir` when it was written for the same `fingerprint`."""
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(seed)
    resume = _prepare_checkpoint_dir(Path(ckpt_dir), fingerprint)
    if resume:
        log.info("resuming from the latest checkpoint in %s", ckpt_dir)
    cuda = torch.cuda.is_available()
    if params.gradient_checkpointing:
        # Enabled here rather than through TrainingArguments, which would also force the input embeddings to require
        # grad and so run backward through every frozen layer (see tuning.enable_gradient_checkpointing).
        from pipeline.tuning import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        max_steps=params.max_steps,
        per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum,
        warmup_steps=max(0, round(params.warmup_ratio * params.max_steps)),
        lr_scheduler_type="cosine",
        weight_decay=params.weight_decay,
        logging_steps=params.logging_steps,
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        bf16=params.bf16 and cuda,
        tf32=cuda or None,
        use_cpu=not cuda,
        disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, optimizers=(optimizer, None))
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    seconds = time.perf_counter() - start
    history = [
        {"step": int(h["step"]), "loss": float(h["loss"]), "lr": float(h.get("learning_rate", 0.0))}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    return TrainResult(
        steps=int(trainer.state.global_step),
        train_seconds=seconds,
        peak_memory_bytes=peak_memory_bytes(),
        loss_history=history,
        final_loss=history[-1]["loss"] if history else float("nan"),
    )


def finish(ckpt_dir: Path) -> None:
    """Drop the resume checkpoints once the final model is safely written."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def train_visual(
    model: nn.Module,
    processor,
    dataset: datasets.Dataset,
    *,
    trainability,
    projector_lr: float,
    lm_lr: float,
    params: TrainParams,
    ckpt_dir: Path,
    seed: int,
    fingerprint: dict,
) -> tuple[nn.Module, TrainResult, dict]:
    """Stage 1 and stage 2 alike: apply the declared trainability, train on visual conversations, and return
    (a plain model ready to save, with LoRA merged; the training result; the trainability report)."""
    from pipeline.tuning import (
        apply_trainability, build_optimizer, disable_gradient_checkpointing, install_backward_stop, merge_for_export,
        optimizer_state_bytes, trainability_report,
    )

    encoded, truncated = encode_visual_dataset(dataset, processor, max_length=params.max_length, on_overflow=params.on_overflow)
    torch.manual_seed(seed)  # LoRA adapters are initialised from the global RNG
    trainable = apply_trainability(model, trainability)
    stop = install_backward_stop(trainable)  # no graph below the lowest trainable layer when nothing upstream trains
    report = trainability_report(trainable) | {"truncated_samples": truncated}
    optimizer = build_optimizer(trainable, projector_lr=projector_lr, lm_lr=lm_lr, weight_decay=params.weight_decay)
    collator = VisualCollator(pad_token_id=processor.tokenizer.pad_token_id)
    result = train(
        trainable, encoded, collator=collator, optimizer=optimizer, params=params, ckpt_dir=ckpt_dir, seed=seed,
        fingerprint=fingerprint,
    )
    report["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    stop.remove()
    if params.gradient_checkpointing:
        disable_gradient_checkpointing(trainable)
    merged = merge_for_export(trainable)
    merged.requires_grad_(False)
    return merged, result, report


def loss_csv(history: list[dict]) -> str:
    return "step,loss\n" + "".join(f"{h['step']},{h['loss']}\n" for h in history)
