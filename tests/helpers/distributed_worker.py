"""Micro training cases shared by tests/unit/test_distributed.py: each is run once in the test process (1 process, batch
4) and once by this file under `torchrun --nproc_per_node 2` (gloo on CPU, batch 2 per process). Not a test module.

    torchrun --nproc_per_node 2 tests/helpers/distributed_worker.py MICRO_DIR OUT_DIR

Under torchrun, rank 0 saves each case's trained weights to OUT_DIR/<case>.pt plus a JSON of what the DDP / FSDP
wrapping registered; the test compares them with the single-process weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import datasets  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import data  # noqa: E402
from pipeline import distributed as dist_helpers  # noqa: E402
import pipeline.model  # noqa: E402
from pipeline import training  # noqa: E402
from pipeline import tuning  # noqa: E402
from pipeline.config import DistributedParams, TrainParams  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 4  # 4 steps x 4 samples = the 16 records once: one epoch
LORA = tuning.LoraSpec(r=4, alpha=8, dropout=0.0)
ANSWERS = ["red", "a big blue square", "two", "the shape on the left of the image is green"]

# name -> (trainability, strategy). `uniform` is the micro4 model's uniform 50% selection: layers 1 and 3 train,
# layers 0 and 2 are frozen. `stopped` freezes the projector too, so the backward stop detaches layers 0..2's inputs.
CASES = {
    "uniform": (tuning.Trainability(language_model="full", layers=(1, 3)), "ddp"),
    "lora": (tuning.Trainability(language_model="lora", layers=(1, 3), lora=LORA), "ddp"),
    "stopped": (tuning.Trainability(projector="frozen", language_model="full", layers=(3,)), "ddp"),
    "fsdp_uniform": (tuning.Trainability(language_model="full", layers=(1, 3)), "fsdp"),
    "fsdp_lora": (tuning.Trainability(language_model="lora", layers=(1, 3), lora=LORA), "fsdp"),
    "fsdp_stopped": (tuning.Trainability(projector="frozen", language_model="full", layers=(3,)), "fsdp"),
}
REFERENCE = {"fsdp_uniform": "uniform", "fsdp_lora": "lora", "fsdp_stopped": "stopped", "resume": "uniform",
             "fsdp_resume": "uniform"}


def dataset() -> datasets.Dataset:
    """16 records whose answers differ in length, so the two halves of a global batch hold different numbers of
    label tokens (the loss must be averaged over the global batch's tokens, not per process)."""
    records = [
        {"id": str(i), "image": Image.new("RGB", (32, 32), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)),
         "qtype": "colour",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                           {"from": "gpt", "value": ANSWERS[(i * 3) % 4] if i % 3 else ANSWERS[(i + 1) % 4]}]}
        for i in range(16)
    ]
    return datasets.Dataset.from_list(records, features=data.VISUAL_FEATURES)


def train_case(name: str, micro_dir, ckpt_dir, *, processes: int, strategy: str = "ddp"):
    """Train case `name` with a global batch of 4 over `processes` processes; returns (merged model or None on
    ranks > 0, TrainResult)."""
    spec = CASES[REFERENCE.get(name, name)][0]
    model, processor = pipeline.model.load_vlm(micro_dir)
    params = TrainParams(
        max_steps=STEPS, batch_size=GLOBAL_BATCH // processes, global_batch_size=GLOBAL_BATCH, max_length=64,
        warmup_ratio=0.0, logging_steps=1, save_steps=2, distributed=DistributedParams(strategy=strategy),
    )
    merged, result, _ = training.train_visual(
        model, processor, dataset(), trainability=spec, projector_lr=1e-3, lm_lr=1e-3, params=params,
        ckpt_dir=Path(ckpt_dir), seed=0, fingerprint={"case": name}, reload=lambda: pipeline.model.load_vlm(micro_dir)[0],
    )
    return merged, result


# ------------------------------------------------------------------------------------------------ under torchrun
class Interrupted(RuntimeError):
    pass


def _allow_fsdp_on_cpu() -> None:
    """accelerate enables FSDP only on accelerators and silently falls back to DDP on CPU processes; torch's FSDP2
    itself runs on CPU with gloo. For this test only, let accelerate take the FSDP plugin on CPU, so that our FSDP
    glue (wrap classes, optimizer hand-over, gathering the DTensor shards, reload + merge) runs for real."""
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    accelerate.state.AcceleratorState.__init__ = init


def recording_factory(base_factory, crash_at: dict, made: list):
    """A replacement for pipeline.training._trainer_class: its Trainers append themselves to `made` (to inspect
    their DDP wrapper) and raise `Interrupted` at the start of step crash_at["step"] when set (a crash right after
    that step's checkpoint); `crash.steps_run` counts the optimizer steps a Trainer actually ran."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def __init__(self):
            self.steps_run = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if crash_at.get("step") is not None and state.global_step == crash_at["step"]:
                raise Interrupted(f"interrupted at step {state.global_step}")
            self.steps_run += 1

    def factory():
        cls = base_factory()

        class Recorded(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.crash = Crash()
                self.add_callback(self.crash)
                made.append(self)

        return Recorded

    return factory


def interrupted_then_resumed(name: str, micro_dir, ckpt_dir: Path, *, processes: int, crash_at: dict, made: list,
                             strategy: str = "ddp"):
    """Case `name` interrupted at the start of step 3 (checkpoint-2 on disk), then started again: returns (merged
    model or None, report). Every rank resumes from checkpoint-2."""
    crash_at["step"] = 2
    try:
        train_case(name, micro_dir, ckpt_dir, processes=processes, strategy=strategy)
        raise AssertionError("the interruption did not happen")
    except Interrupted:
        pass
    finally:
        crash_at["step"] = None
    checkpoints = sorted(p.name for p in Path(ckpt_dir).glob("checkpoint-*"))
    merged, result = train_case(name, micro_dir, ckpt_dir, processes=processes, strategy=strategy)
    return merged, {"checkpoints_after_interruption": checkpoints, "steps": result.steps,
                    "steps_run_after_resume": made[-1].crash.steps_run}


def _wrapping(trainer) -> dict:
    wrapped = trainer.model_wrapped
    info = {"wrapper": type(wrapped).__name__, "fsdp": bool(trainer.is_fsdp_enabled)}
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        logging_data = wrapped._get_ddp_logging_data()
        info["ddp_param_bytes"] = int(logging_data["total_parameter_size_bytes"])
        info["ddp_find_unused_parameters"] = bool(logging_data["find_unused_parameters"])
    return info


def main(micro_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    _allow_fsdp_on_cpu()
    crash_at: dict = {}
    trainers: list = []
    training._trainer_class = recording_factory(training._trainer_class, crash_at, trainers)
    rank0 = dist_helpers.is_main()
    report = {"world_size": dist_helpers.world_size()}
    # DDP cases first: enabling FSDP leaves ACCELERATE_USE_FSDP in the environment for the rest of the process
    for name, (_, strategy) in sorted(CASES.items(), key=lambda kv: kv[1][1] == "fsdp"):
        merged, result = train_case(name, micro_dir, out / "ckpt" / name, processes=2, strategy=strategy)
        report[name] = _wrapping(trainers[-1]) | {"steps": result.steps, "returned_model": merged is not None}
        if rank0:
            torch.save(merged.state_dict(), out / f"{name}.pt")
        if name == "stopped":  # the last DDP case
            merged, report["resume"] = interrupted_then_resumed(
                "resume", micro_dir, out / "ckpt" / "resume", processes=2, crash_at=crash_at, made=trainers)
            if rank0:
                torch.save(merged.state_dict(), out / "resume.pt")
    merged, report["fsdp_resume"] = interrupted_then_resumed(
        "fsdp_resume", micro_dir, out / "ckpt" / "fsdp_resume", processes=2, crash_at=crash_at, made=trainers,
        strategy="fsdp")
    if rank0:
        torch.save(merged.state_dict(), out / "fsdp_resume.pt")
    reports = [None] * dist_helpers.world_size()
    torch.distributed.all_gather_object(reports, report)
    if rank0:
        (out / "report.json").write_text(json.dumps(reports, indent=1))
    dist_helpers.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
