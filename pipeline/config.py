"""The params schema: params.yaml is validated on load; an unknown key, a wrong type or a bad value is an error
naming the key (e.g. `tune.runs.uniform25.budget`). The typed classes below *are* the schema."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import data as D
from pipeline.model import PROFILES, ProfileSpec
from pipeline.selection import STRATEGIES
from pipeline.tuning import LoraSpec

for _cls in (LoraSpec, D.DataConfig):
    _cls.__pydantic_config__ = ConfigDict(extra="forbid")


class ParamsError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelParams(_Strict):
    profile: Literal["tiny", "micro", "hf"] = "tiny"
    spec: dict[str, int | str] = {}  # overrides of the tiny/micro shape (fields of pipeline.model.ProfileSpec)
    vision: str | None = None  # hf profile: vision encoder path or hub id (CLIP or SigLIP)
    language_model: str | None = None  # hf profile: causal LM path or hub id (Llama family)
    checkpoint: str | None = None  # hf profile: an existing LLaVA checkpoint instead of composing one
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    # The conversation format (pipeline/data/chat.py): plain | vicuna_v1 | tokenizer (the LM's own template, e.g.
    # Llama-3's). null: plain for tiny/micro, vicuna_v1 for a composed hf model, the checkpoint's own otherwise.
    chat_template: Literal["plain", "vicuna_v1", "tokenizer"] | None = None

    @model_validator(mode="after")
    def _check_sources(self):
        if self.profile == "hf":
            composed = self.vision is not None and self.language_model is not None
            if composed == (self.checkpoint is not None):
                raise ValueError("profile 'hf' needs either `checkpoint` or both `vision` and `language_model`")
        else:
            if self.vision or self.language_model or self.checkpoint:
                raise ValueError(f"profile {self.profile!r} is built offline: vision/language_model/checkpoint must be null")
            self.profile_spec()  # unknown or bad shape fields fail here, at load time
        return self

    def conversation_format(self) -> str:
        if self.chat_template is not None:
            return self.chat_template
        if self.profile != "hf":
            return "plain"
        return "tokenizer" if self.checkpoint else "vicuna_v1"

    def profile_spec(self) -> ProfileSpec:
        if self.profile == "hf":
            raise ValueError("the hf profile has no offline spec")
        known = {f.name for f in dataclasses.fields(ProfileSpec)}
        unknown = sorted(set(self.spec) - known)
        if unknown:
            raise ValueError(f"spec: unknown field(s) {unknown}; expected some of {sorted(known)}")
        return dataclasses.replace(PROFILES[self.profile], **self.spec)


class DistributedParams(_Strict):
    """How training is spread over the processes of a multi-process launch (`torchrun` / `accelerate launch`, see
    pipeline/distributed.py and docs/multi-gpu.md); ignored in a single process."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    find_unused_parameters: bool = False  # ddp: every trainable parameter is used in every step
    fsdp_wrap: list[str] | None = None  # fsdp: module classes sharded as units; null: the decoder (+ vision) layer class
    fsdp_reshard_after_forward: bool = True  # fsdp: True = full_shard (ZeRO-3), False = shard_grad_op (ZeRO-2)
    fsdp_cpu_offload: bool = False
    deepspeed_config: str | None = None  # deepspeed: path to a DeepSpeed JSON config (e.g. configs/deepspeed/zero3.json)
    timeout_s: int = Field(1800, ge=60)  # collectives, including the wait for rank 0 to write the outputs

    @model_validator(mode="after")
    def _deepspeed(self):
        if (self.strategy == "deepspeed") != (self.deepspeed_config is not None):
            raise ValueError("deepspeed_config is needed with strategy 'deepspeed', and only with it")
        return self


class TrainParams(_Strict):
    max_steps: int = Field(200, ge=0)
    batch_size: int = Field(16, ge=1)  # per process (per GPU)
    grad_accum: int = Field(1, ge=1)
    # Samples per optimizer step over all processes: grad_accum = global_batch_size / (batch_size x processes), so
    # the same params give the same schedule on 1 or N GPUs. null: grad_accum as given (global = batch x accum x N).
    global_batch_size: int | None = Field(None, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(128, ge=8)
    on_overflow: Literal["truncate", "refuse"] = "truncate"
    gradient_checkpointing: bool = False
    save_steps: int = Field(50, ge=1)
    logging_steps: int = Field(10, ge=1)
    bf16: bool = False  # GPU only
    # The input pipeline (pipeline/data/encoding.py): samples encoded lazily, per record, in this many DataLoader
    # worker processes (0: in the training process), or eagerly before training; auto: eager only for small data.
    dataloader_num_workers: int = Field(0, ge=0)
    preprocess: Literal["auto", "eager", "lazy"] = "auto"
    group_by_modality_length: bool = False  # LLaVA's batches of one modality and similar lengths
    distributed: DistributedParams = DistributedParams()

    @model_validator(mode="after")
    def _batch(self):
        if self.global_batch_size is not None:
            if self.grad_accum != 1:
                raise ValueError("set grad_accum or global_batch_size, not both (grad_accum is derived from it)")
            if self.global_batch_size % self.batch_size:
                raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of batch_size {self.batch_size}")
        return self

    def grad_accum_for(self, processes: int) -> int:
        """Gradient accumulation steps on `processes` processes (see global_batch_size)."""
        if self.global_batch_size is None:
            return self.grad_accum
        per_step = self.batch_size * processes
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of batch_size {self.batch_size} x "
                f"{processes} processes; change batch_size or the number of processes"
            )
        return self.global_batch_size // per_step


class LMPretrainParams(_Strict):
    """Tiny profile only: pretrain the tiny LM on text so there is text ability to preserve."""

    lr: float = Field(3e-3, gt=0)
    seq_len: int = Field(128, ge=8)
    train: TrainParams = TrainParams(max_steps=600, batch_size=16)


class VisionPretrainParams(_Strict):
    """Tiny/micro only: contrastive pretraining of the tiny vision tower on `data.vision_pairs` image-text pairs, as
    CLIP (or SigLIP, after model.spec.vision_type) learnt, with a small text encoder that is then dropped. The paper's
    vision encoders come pretrained and frozen; a random frozen tower leaves the LM layers to do the seeing.
    train.max_steps 0: the tower stays random. Ignored by the hf profile, whose encoder comes pretrained."""

    lr: float = Field(1e-3, gt=0)
    text_layers: int = Field(2, ge=1)
    eval_pairs: int = Field(256, ge=2)  # held out from training, for the image-to-caption retrieval metric
    train: TrainParams = TrainParams(max_steps=0, batch_size=64, max_length=48)  # max_length: caption tokens


class ProjectorParams(_Strict):
    lr: float = Field(1e-3, gt=0)
    train: TrainParams = TrainParams()


class TuneRun(_Strict):
    strategy: str | list[int] = "uniform"
    budget: float | int = 0.25
    seed: int = 0
    language_model: Literal["full", "lora", "frozen"] = "full"
    projector: Literal["full", "frozen"] = "full"
    importance_metric: str | None = None  # strategy 'importance': which score
    importance_from: str | None = None  # strategy 'importance': the tune run whose model is scored

    @field_validator("strategy")
    @classmethod
    def _known(cls, v):
        if isinstance(v, str) and v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; expected one of {list(STRATEGIES)} or a list of layer indices")
        if isinstance(v, list):
            if not v:
                raise ValueError("an explicit layer list must not be empty")
            if any(i < 0 for i in v):
                raise ValueError(f"layer indices must be >= 0 (0-based), got {sorted(i for i in v if i < 0)}")
            if len(set(v)) != len(v):
                raise ValueError(f"duplicate layer indices {sorted({i for i in v if v.count(i) > 1})}")
        return v

    @field_validator("importance_metric")
    @classmethod
    def _metric(cls, v):
        from pipeline.importance import METRICS

        if v is not None and v not in METRICS:
            raise ValueError(f"unknown importance metric {v!r}; expected one of {list(METRICS)}")
        return v

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v):
        if isinstance(v, bool):
            raise ValueError("budget must be a ratio in (0, 1] or a layer count")
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"budget ratio must be in (0, 1], got {v}")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"budget count must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _importance(self):
        if self.strategy == "importance" and not (self.importance_metric and self.importance_from):
            raise ValueError("strategy 'importance' needs importance_metric and importance_from")
        return self


class TuneParams(_Strict):
    runs: dict[str, TuneRun]
    # Runs whose layers are the top-k of another run's per-layer scores (the paper's importance-based selection):
    # trained after that run has been tuned and scored, hence a group of their own in dvc.yaml.
    importance_runs: dict[str, TuneRun] = {}
    projector_lr: float = Field(2e-5, gt=0)
    lm_lr: float = Field(2e-4, gt=0)
    embeddings: bool = False
    lm_head: bool = False
    lora: LoraSpec = LoraSpec()
    train: TrainParams = TrainParams()

    @field_validator("runs")
    @classmethod
    def _names(cls, runs):
        if not runs:
            raise ValueError("at least one tune run is needed")
        for name in runs:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
                raise ValueError(f"run name {name!r} must match [a-z0-9][a-z0-9_-]*")
        if "all" not in runs:
            raise ValueError("tune.runs needs an 'all' run: it is the baseline every retention is measured against")
        if runs["all"].strategy != "all":
            raise ValueError(f"tune.runs.all must use strategy 'all' (the full-tuning baseline), got {runs['all'].strategy!r}")
        for name, run in runs.items():
            if run.strategy == "importance":
                raise ValueError(f"{name}: importance-selected runs belong in tune.importance_runs")
        return runs

    @field_validator("importance_runs")
    @classmethod
    def _scored(cls, runs):
        for name, run in runs.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
                raise ValueError(f"run name {name!r} must match [a-z0-9][a-z0-9_-]*")
            if run.strategy != "importance":
                raise ValueError(f"{name}: tune.importance_runs entries need strategy 'importance', got {run.strategy!r}")
        return runs

    def all_runs(self) -> dict[str, TuneRun]:
        return self.runs | self.importance_runs

    def run(self, name: str) -> TuneRun:
        runs = self.all_runs()
        if name not in runs:
            raise ValueError(f"--run {name!r}: no such entry in tune.runs or tune.importance_runs (have {sorted(runs)})")
        return runs[name]


class PruningCurveParams(_Strict):
    """Visual score after removing 1..max_layers layers from each listed run (protected for selective runs,
    conventional for `all`), for the paper's pruning comparison."""

    runs: list[str] = ["all"]
    max_layers: int = Field(3, ge=1)
    # A short healing tune after each cut (an extension: the paper describes none): the run's own trainable set (its
    # region, remapped past the removed layers; every layer for `all`) with tune's learning rates and batch, for this
    # many steps. Each point then has a `healed` score beside the unhealed one. 0: no healing.
    heal_steps: int = Field(0, ge=0)


class PruneParams(_Strict):
    num_layers: int = Field(2, ge=1)
    curve: PruningCurveParams = PruningCurveParams()
    metric: Literal["angular", "bi", "mm_bi"] = "angular"
    calibration_samples: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)


class EvaluateParams(_Strict):
    max_new_tokens: int = Field(6, ge=1)
    batch_size: int = Field(32, ge=1)
    vqa_samples: int = Field(300, ge=1)
    digits_samples: int = Field(200, ge=1)
    text_qa_samples: int = Field(200, ge=1)
    text_ppl_chunks: int = Field(100, ge=1)


class MlflowParams(_Strict):
    experiment: str = "visual-region"


class RegistryParams(_Strict):
    """The MLflow model registry (stage `register`): every run's checkpoints of the listed kinds become versions of
    `<model_name>-<run>[-tuned]` with alias `challenger`; `champion` only when both retentions (score / the `all`
    run's tuned score) reach their thresholds."""

    enabled: bool = True
    model_name: str = Field("visual-region", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kinds: list[Literal["pruned", "tuned"]] = Field(["pruned"], min_length=1)
    min_visual_retention: float = Field(0.9, ge=0, le=1)
    min_text_retention: float = Field(0.9, ge=0)


class Params(_Strict):
    seed: int = 0
    model: ModelParams = ModelParams()
    data: D.DataConfig = D.DataConfig()
    lm_pretrain: LMPretrainParams = LMPretrainParams()
    vision_pretrain: VisionPretrainParams = VisionPretrainParams()
    pretrain_projector: ProjectorParams = ProjectorParams()
    tune: TuneParams
    prune: PruneParams = PruneParams()
    evaluate: EvaluateParams = EvaluateParams()
    mlflow: MlflowParams = MlflowParams()
    registry: RegistryParams = RegistryParams()

    @model_validator(mode="after")
    def _cross(self):
        duplicated = sorted(set(self.tune.runs) & set(self.tune.importance_runs))
        if duplicated:
            raise ValueError(f"tune: run names {duplicated} appear in both runs and importance_runs")
        for name, run in self.tune.importance_runs.items():
            if run.importance_from not in self.tune.runs:
                raise ValueError(f"tune.importance_runs.{name}.importance_from: no entry of tune.runs named {run.importance_from!r}")
        if self.model.profile != "hf" and self.vision_pretrain.train.max_steps > 0:  # hf: the encoder comes pretrained
            if self.data.vision_pairs <= self.vision_pretrain.eval_pairs:
                raise ValueError(f"vision_pretrain.train.max_steps > 0 needs data.vision_pairs > vision_pretrain.eval_pairs "
                                 f"({self.vision_pretrain.eval_pairs}), got {self.data.vision_pairs}")
        unknown = sorted(set(self.prune.curve.runs) - set(self.tune.all_runs()))
        if unknown:
            raise ValueError(f"prune.curve.runs: {unknown} are not tune runs")
        return self


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid params in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].replace("Unexpected keyword argument", "unknown key").replace("Extra inputs are not permitted", "unknown key")
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def validate(raw: dict, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"invalid params in {source}: expected a mapping at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format(err, source)) from None


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"params file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"params file {path} is not valid YAML: {err}") from None
    return validate(raw, str(path))
