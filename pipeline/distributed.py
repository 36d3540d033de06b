"""The training stages under a multi-process launcher (one process per GPU), on PyTorch distributed via the
transformers Trainer and accelerate:

    torchrun --nproc_per_node 8 -m stages.tune --run uniform25
    accelerate launch --num_processes 8 -m stages.tune --run uniform25

Every process loads the model and the data and trains on its share of each global batch; the Trainer (accelerate)
sets up the process group and wraps the model for the strategy in `tune.train.distributed` (DDP, FSDP2, DeepSpeed).
Only rank 0 writes stage outputs and logs to MLflow (`is_main`); the others wait at a barrier until it is done and
leave (`shutdown`). A plain `python -m stages.tune` is one process: every helper here is then a no-op and the
Trainer gets exactly the arguments it got before (`trainer_kwargs` returns {}).

Selective tuning under each strategy (frozen parameters have requires_grad=False before wrapping):
  - DDP registers only parameters that require grad, so gradients are all-reduced for the trainable ones only, and
    every trainable parameter is used in every forward (projector + selected layers / their LoRA adapters), so
    `find_unused_parameters=False` (no extra graph traversal; DDP raises if that assumption ever breaks).
  - FSDP2 (`fully_shard`, per-parameter sharding) takes frozen and trainable parameters in one unit; each decoder
    layer (and vision encoder layer) is its own unit, so a frozen layer's parameters are gathered for forward and
    never reduce-scattered. FSDP1's `use_orig_params` question does not arise.
  - DeepSpeed ZeRO-3 shards every parameter; gradients and optimizer state exist for the trainable ones only
    (optional: deepspeed is not in the lock file, and this path is untested).
"""

from __future__ import annotations

import os
import shlex

LAUNCHER_ENV = "VR_LAUNCHER"  # e.g. "torchrun --standalone --nproc_per_node 8": the training stages relaunch under it
_LAUNCHED_ENV = "VR_LAUNCHED"  # set in the relaunched processes, so that they never relaunch again

# Launchers set one of these (torchrun / accelerate: RANK and WORLD_SIZE; MPI-based CPU launches: the others).
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def world_size() -> int:
    """Number of training processes of this launch (1 without a launcher)."""
    return _env_int(_SIZE_VARS, 1)


def rank() -> int:
    return _env_int(_RANK_VARS, 0)


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """The process that writes outputs and logs to MLflow: rank 0 (the only one without a launcher)."""
    return rank() == 0


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op in one process or before the Trainer has set up the process group)."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def broadcast_from_main(value):
    """Rank 0's `value` on every rank (picklable objects; identity in one process)."""
    if not _initialized():
        return value
    import torch.distributed as dist

    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    """End of a stage: every rank waits here until rank 0 has written its outputs, then the process group is
    destroyed so that each process exits cleanly (no-op in one process)."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def wrap_classes(model, names: list[str] | None = None) -> list[str]:
    """Module class names FSDP shards as units of their own: `names` when given, else the language model's decoder
    layer class plus the model's other `_no_split_modules` present in it (e.g. the vision encoder layer)."""
    if names:
        return list(names)
    import pipeline.model

    base = pipeline.model._unwrap(model)
    present = {type(m).__name__ for m in base.modules()}
    decoder = type(pipeline.model.decoder_layers(base)[0]).__name__
    extra = [n for n in (getattr(base, "_no_split_modules", None) or []) if n in present and n != decoder]
    return [decoder, *sorted(set(extra))]


def trainer_kwargs(cfg, model) -> dict:
    """TrainingArguments for the strategy of `cfg` (a config.DistributedParams) under a multi-process launch;
    {} in one process, so a run without a launcher is configured exactly as before."""
    if not is_distributed():
        return {}
    kwargs: dict = {"ddp_timeout": cfg.timeout_s}
    if cfg.strategy == "ddp":
        kwargs["ddp_find_unused_parameters"] = cfg.find_unused_parameters
    elif cfg.strategy == "fsdp":
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = {
            "version": 2,
            "transformer_layer_cls_to_wrap": wrap_classes(model, cfg.fsdp_wrap),
            "reshard_after_forward": cfg.fsdp_reshard_after_forward,
            "cpu_offload": cfg.fsdp_cpu_offload,
            # checkpoints: one shard per rank (resume on as many GPUs); the final model is gathered separately
            # (training._gather_full_state), so the Trainer never needs a full state dict
            "state_dict_type": "SHARDED_STATE_DICT",
        }
    elif cfg.strategy == "deepspeed":
        kwargs["deepspeed"] = cfg.deepspeed_config
    else:  # pragma: no cover - the params schema allows nothing else
        raise ValueError(f"unknown distributed strategy {cfg.strategy!r}")
    return kwargs


def launcher_command(module: str, argv: list[str]) -> list[str] | None:
    """The command that runs stage `module` under the launcher named by $VR_LAUNCHER (how `dvc repro` runs a
    training stage on N GPUs with dvc.yaml's plain `python -m stages.X` command), or None: no launcher set, or this
    process is already one of a launch. `--` ends the launcher's own options (torchrun would otherwise take the
    stages' `--run` for its `--run-path`); torchrun and accelerate both drop it."""
    launcher = os.environ.get(LAUNCHER_ENV, "").strip()
    if not launcher or os.environ.get(_LAUNCHED_ENV) or is_distributed() or "LOCAL_RANK" in os.environ:
        return None
    return [*shlex.split(launcher), "-m", module, "--", *argv]


def relaunch(command: list[str]) -> int:
    """Run `command` (from `launcher_command`) and return its exit code."""
    import subprocess

    return subprocess.call(command, env={**os.environ, _LAUNCHED_ENV: "1"})
