"""Training on the transformers Trainer: supervised visual instruction data (loss on answer tokens only), text
pretraining for the tiny LM, checkpoints for resume, a loss history for plots.

Longer than 400 lines on purpose: the Trainer subclass (`_trainer_class`), its checkpoint fingerprint and resume
rules, the loss guard and the full-state gathering under FSDP all act on one Trainer run and its checkpoint
directory; split across modules they would pass the Trainer's internals between them."""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import time
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from torch import nn

from pipeline.config import ParamsError, TrainParams
from pipeline.data.encoding import (
    ModalityLengthSampler, VisualCollator, check_supervision, modality_lengths, num_image_tokens, visual_samples,
)
from pipeline.data.images import to_rgb
from pipeline.errors import ProjectError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Vision-tower and text pretraining data (tiny / micro profiles only: small, encoded once)
# --------------------------------------------------------------------------------------------------------------
def image_text_dataset(ds: datasets.Dataset, image_processor) -> datasets.Dataset:
    """Caption records (the gpt turn is the caption) -> {pixel_values, caption}, images preprocessed once, for
    contrastive pretraining of a vision tower."""

    def encode(batch):
        pixels = image_processor([to_rgb(im) for im in batch["image"]], return_tensors="np")["pixel_values"]
        return {"pixel_values": list(pixels), "caption": [conv[1]["value"] for conv in batch["conversations"]]}

    first = image_processor([to_rgb(ds[0]["image"])], return_tensors="np")["pixel_values"]
    features = datasets.Features({"pixel_values": datasets.Array3D(shape=first.shape[1:], dtype="float32"),
                                  "caption": datasets.Value("string")})
    return ds.map(encode, batched=True, batch_size=256, remove_columns=ds.column_names, keep_in_memory=True,
                  features=features).with_format("torch", columns=["pixel_values"], output_all_columns=True)


@dataclass
class ImageTextCollator:
    """Batches for CLIP/SigLIP pretraining: each caption ends with `end_id` (see model.contrastive_model) and is
    padded to `max_length`."""

    tokenizer: Any
    end_id: int
    max_length: int

    def __call__(self, batch: list[dict]) -> dict:
        ids = torch.full((len(batch), self.max_length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, b in enumerate(batch):
            tokens = self.tokenizer(b["caption"], add_special_tokens=False)["input_ids"][: self.max_length - 1]
            tokens.append(self.end_id)
            ids[i, : len(tokens)], mask[i, : len(tokens)] = torch.tensor(tokens), 1
        pixels = torch.stack([b["pixel_values"] for b in batch]).float()
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "return_loss": True}


def text_blocks(texts: list[str], tokenizer, seq_len: int) -> datasets.Dataset:
    """Concatenate documents (EOS between them) and cut into fixed-length blocks for causal LM pretraining."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // seq_len
    if n == 0:
        raise ParamsError(f"text corpus has {len(stream)} tokens: fewer than one block of seq_len {seq_len}")
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
    final_loss: float | None = None  # None when no step was logged (fewer steps than logging_steps)
    # Set when the model was sharded (FSDP / DeepSpeed ZeRO-3): the trained weights, gathered whole on rank 0 (CPU);
    # {} on the other ranks. None otherwise: the model passed to `train` then holds them.
    full_state_dict: dict | None = field(default=None, repr=False)


class NonFiniteLossError(ProjectError, RuntimeError):
    """The training loss became NaN or infinite: training stopped, nothing was written; the message names the step and
    the params to change."""


def _loss_guard(params_key: str):
    """A TrainerCallback that stops training with a NonFiniteLossError at the first logged loss that is not finite
    (the Trainer's `logging_nan_inf_filter` is off in `train`, so a NaN step shows in the next logged loss)."""
    import math

    from transformers import TrainerCallback

    class LossGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "train_loss"):
                value = (logs or {}).get(key)
                if value is not None and not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"the training loss is {value} at step {state.global_step}: training diverged (or a batch "
                        f"had no answer token left after {params_key}.max_length), nothing was written; lower the "
                        f"learning rate, raise {params_key}.max_length, or check {params_key}.bf16 and the data")

    return LossGuard()


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _complete_checkpoint(path: Path) -> bool:
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def _prepare_checkpoint_dir(ckpt_dir: Path, fingerprint: dict) -> bool:
    """Keep checkpoints only if they were written for the same run configuration; returns True to resume.
    Rank 0 only under a multi-process launch (see `train`)."""
    stamp = ckpt_dir / "fingerprint.json"
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
    if ckpt_dir.exists():
        # The Trainer writes trainer_state.json last: a checkpoint without a readable one was cut short by a kill.
        for partial in [c for c in ckpt_dir.glob("checkpoint-*") if not _complete_checkpoint(c)]:
            log.warning("dropping checkpoint %s: it was cut short (no complete trainer_state.json)", partial)
            shutil.rmtree(partial)
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
    lengths: list[int] | None = None,
    params_key: str = "train",
) -> TrainResult:
    """Run the transformers Trainer with our optimizer (trainable parameters only), resuming from the latest
    checkpoint in `ckpt_dir` when it was written for the same `fingerprint`.

    Under a multi-process launch (pipeline/distributed.py) every rank calls this; the Trainer sets up the process
    group and the DDP / FSDP / DeepSpeed wrapping from `params.distributed`, rank 0 alone prepares `ckpt_dir` and
    writes the checkpoints, and every rank resumes from the same one. After a sharded run the trained weights are
    returned gathered in `TrainResult.full_state_dict` (the model object itself is left sharded). `lengths` (one per
    sample, negative for text-only ones): batches grouped by modality and length (data.encoding.ModalityLengthSampler).
    `params_key` (e.g. `tune.train`): where `params` came from, named by the errors. Zero steps are refused
    (ParamsError) and a non-finite loss stops training (NonFiniteLossError)."""
    from transformers import TrainingArguments, set_seed

    from pipeline import distributed

    check_steps(params, params_key)
    set_seed(seed)
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
        gradient_accumulation_steps=params.grad_accum_for(distributed.world_size()),
        warmup_steps=max(0, round(params.warmup_ratio * params.max_steps)),
        lr_scheduler_type="cosine",
        weight_decay=params.weight_decay,
        logging_steps=params.logging_steps,
        logging_nan_inf_filter=False,  # a NaN step must show in the logged loss (see _loss_guard); no effect otherwise
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=params.dataloader_num_workers,
        dataloader_persistent_workers=params.dataloader_num_workers > 0,
        bf16=params.bf16 and cuda,
        tf32=cuda or None,
        use_cpu=not cuda,
        disable_tqdm=False,
        **distributed.trainer_kwargs(params.distributed, model),
    )
    _ = args.device  # sets up the process group under a multi-process launch (no-op otherwise)
    resume = _prepare_checkpoint_dir(Path(ckpt_dir), fingerprint) if distributed.is_main() else None
    resume = distributed.broadcast_from_main(resume)  # rank 0 decided (and cleaned up); every rank resumes alike
    if resume:
        log.info("resuming from the latest checkpoint in %s", ckpt_dir)
    sampler = None
    if lengths is not None:
        sampler = ModalityLengthSampler(lengths, params.batch_size * args.gradient_accumulation_steps * distributed.world_size(),
                                        seed=seed)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=dataset, data_collator=collator, own_optimizer=optimizer,
        train_sampler=sampler, callbacks=[_loss_guard(params_key)],
    )
    if distributed.is_distributed() and params.distributed.strategy == "fsdp" and not trainer.is_fsdp_enabled:
        raise ParamsError(  # accelerate silently falls back to DDP where it has no FSDP (on CPU processes)
            "distributed.strategy 'fsdp' needs GPUs (accelerate shards only on accelerators); use 'ddp' on CPU"
        )
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=True if resume else None)
    except BaseException:
        _close_progress_bars(trainer)  # the error's log line then starts a line of its own
        raise
    seconds = time.perf_counter() - start
    full_state = _gather_full_state(trainer) if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled else None
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
        final_loss=history[-1]["loss"] if history else None,
        full_state_dict=full_state,
    )


def _close_progress_bars(trainer) -> None:
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
            callback.training_bar.close()
            callback.training_bar = None


def check_steps(params: TrainParams, params_key: str) -> None:
    """Zero steps would train nothing and still write a model: a ParamsError naming the key."""
    if params.max_steps < 1:
        raise ParamsError(f"{params_key}.max_steps is {params.max_steps}: nothing would be trained; set it to at least 1")


def _gather_full_state(trainer) -> dict:
    """The trained weights of a sharded model, whole, on rank 0 (CPU); {} elsewhere. Collective: every rank calls it.
    FSDP2: each parameter is a DTensor shard, gathered one at a time (peak extra memory: one full parameter)."""
    from torch.distributed.tensor import DTensor

    from pipeline import distributed

    state = trainer.model_wrapped.state_dict() if trainer.is_fsdp_enabled else {}
    if any(isinstance(v, DTensor) for v in state.values()):  # FSDP2
        full = {}
        for name, value in state.items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
            if distributed.is_main():
                full[name] = value.detach().to("cpu", copy=True)
        return full
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # DeepSpeed ZeRO-3 (16-bit gather), FSDP1
    if trainer.is_deepspeed_enabled:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # else rank 0's `reload` (train_visual) would load under zero.Init, alone
    return state if distributed.is_main() else {}


TRAINABLE_WEIGHTS = "trainable.safetensors"


def _trainer_class():
    from transformers import Trainer

    class OwnOptimizerTrainer(Trainer):
        """The Trainer with our optimizer (trainable parameters only, per-component learning rates), handed over
        through `create_optimizer`: FSDP and DeepSpeed refuse `optimizers=` but ask for it there (FSDP2 and
        DeepSpeed re-point it at their sharded parameters); in one process or under DDP it is the same object.

        Checkpoints of an unsharded model hold its trainable parameters only, under their in-memory names
        (`trainable.safetensors`): frozen ones never change, so these restore the training state exactly. The
        Trainer's own format does not round-trip here: it saves LLaVA with transformers' original-format key names
        and loads them back with strict=False, so nothing matched and a resumed run silently restarted from the
        untrained weights; for a peft model it saved the adapters but not the trainable projector. FSDP and
        DeepSpeed keep their own (sharded) checkpoints, which use the in-memory names."""

        def __init__(self, *args, own_optimizer: torch.optim.Optimizer, train_sampler=None, **kwargs):
            super().__init__(*args, **kwargs)
            self._own_optimizer = own_optimizer
            self._own_sampler = train_sampler

        def _get_train_sampler(self, train_dataset=None):
            if self._own_sampler is not None:
                return self._own_sampler
            return super()._get_train_sampler(train_dataset)

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = self._own_optimizer
            return self.optimizer

        def _sharded(self) -> bool:
            return bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            if self._sharded():
                return super()._save(output_dir, state_dict=state_dict)
            if not self.args.should_save:  # rank 0 writes
                return
            from safetensors.torch import save_file

            out = Path(output_dir if output_dir is not None else self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            model = self.accelerator.unwrap_model(self.model)
            save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                      str(out / TRAINABLE_WEIGHTS))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            path = Path(resume_from_checkpoint) / TRAINABLE_WEIGHTS
            if self._sharded() or not path.exists():
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            from safetensors.torch import load_file

            model = self.accelerator.unwrap_model(model if model is not None else self.model)
            state = load_file(str(path))
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            if set(state) != trainable:
                raise ValueError(
                    f"checkpoint {path} does not hold exactly the trainable parameters: missing "
                    f"{sorted(trainable - set(state))[:3]}, unexpected {sorted(set(state) - trainable)[:3]}"
                )
            model.load_state_dict(state, strict=False)  # exactly the trainable ones (checked above)

    return OwnOptimizerTrainer


def finish(ckpt_dir: Path) -> None:
    """Drop the resume checkpoints once the final model is safely written."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)


@dataclass
class VisualSamples:
    """The training samples of a visual stage, checked to teach something (`prepare_visual`)."""

    samples: Any  # torch Dataset (lazy) or datasets.Dataset (eager)
    truncated: int | None  # samples cut at max_length (None when lazy)
    lengths: list[int] | None  # per sample, for group_by_modality_length


def prepare_visual(dataset: datasets.Dataset, processor, params: TrainParams, *, data_name: str = "dataset",
                   params_key: str = "train") -> VisualSamples:
    """The samples `train_visual` trains on, refused before anything starts (a ParamsError or DataError naming the
    params key) when training could learn nothing: zero steps, no answer token left after max_length, no image
    record. A stage calls it before its MLflow run starts, then hands the result to `train_visual`."""
    check_steps(params, params_key)
    samples, truncated = visual_samples(dataset, processor, max_length=params.max_length, on_overflow=params.on_overflow,
                                        preprocess=params.preprocess, source=data_name, params_key=params_key)
    check_supervision(dataset, samples, processor, max_length=params.max_length, on_overflow=params.on_overflow,
                      source=data_name, params_key=params_key)
    lengths = modality_lengths(dataset, num_image_tokens(processor)) if params.group_by_modality_length else None
    return VisualSamples(samples, truncated, lengths)


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
    reload: Callable[[], nn.Module] | None = None,
    data_name: str = "dataset",
    params_key: str = "train",
    prepared: VisualSamples | None = None,
) -> tuple[nn.Module | None, TrainResult, dict]:
    """Stage 1 and stage 2 alike: apply the declared trainability, train on visual conversations, and return
    (a plain model ready to save, with LoRA merged; the training result; the trainability report).

    After a sharded run (FSDP / ZeRO-3, see `train`) `model` is left sharded: rank 0 builds the returned model from
    `reload()` (a fresh copy of the untrained model, e.g. loaded again from disk) and the gathered weights, and the
    other ranks get None. `data_name` and `params_key` (e.g. `tune.train`) are named by the errors about `dataset`.
    `prepared`: `prepare_visual`'s result for `dataset`, when the caller checked it already (else done here)."""
    from pipeline.tuning import (
        apply_trainability, build_optimizer, disable_gradient_checkpointing, install_backward_stop, merge_for_export,
        optimizer_state_bytes, trainability_report,
    )

    if prepared is None:
        prepared = prepare_visual(dataset, processor, params, data_name=data_name, params_key=params_key)
    samples, truncated, lengths = prepared.samples, prepared.truncated, prepared.lengths
    torch.manual_seed(seed)  # LoRA adapters are initialised from the global RNG
    trainable = apply_trainability(model, trainability)
    stop = install_backward_stop(trainable)  # no graph below the lowest trainable layer when nothing upstream trains
    report = trainability_report(trainable) | {"truncated_samples": truncated}
    optimizer = build_optimizer(trainable, projector_lr=projector_lr, lm_lr=lm_lr, weight_decay=params.weight_decay)
    collator = VisualCollator(pad_token_id=processor.tokenizer.pad_token_id)
    result = train(
        trainable, samples, collator=collator, optimizer=optimizer, params=params, ckpt_dir=ckpt_dir, seed=seed,
        fingerprint=fingerprint, lengths=lengths, params_key=params_key,
    )
    report["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    stop.remove()
    if params.gradient_checkpointing:
        disable_gradient_checkpointing(trainable)
    if result.full_state_dict is not None:
        from pipeline import distributed

        if not distributed.is_main():
            return None, result, report
        if reload is None:
            raise ValueError("the model was sharded (FSDP / DeepSpeed): train_visual needs `reload` to export it")
        trainable = apply_trainability(reload(), trainability)  # same structure (LoRA adapters included)
        trainable.load_state_dict(result.full_state_dict, strict=True)
        result.full_state_dict = None
    merged = merge_for_export(trainable)
    merged.requires_grad_(False)
    return merged, result, report


def loss_csv(history: list[dict]) -> str:
    return "step,loss\n" + "".join(f"{h['step']},{h['loss']}\n" for h in history)
