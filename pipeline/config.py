"""The params schema: params.yaml is validated on load; an unknown key, a wrong type or a bad value is an error
naming the key (e.g. `tune.runs.uniform25.budget`). The typed classes below *are* the schema, including the value
objects other modules take (DataConfig for pipeline.data, ProfileSpec for pipeline.model, LoraSpec for
pipeline.tuning), so loading params imports neither torch nor any library that does.

Longer than 400 lines on purpose: it is the whole schema, one class per params.yaml section, so that this one file
is the reference for every key (docs/pipeline.md explains them)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ProjectError
from pipeline.selection import STRATEGIES

# The per-layer importance scores pipeline/importance.py computes; `importance_metric` names one of them.
HIDDEN_METRICS = ("bi", "angular", "bi_image", "bi_text", "mm_bi")
PARAM_METRICS = ("param_change", "param_angular")
METRICS = (*HIDDEN_METRICS, "image_attention", *PARAM_METRICS)


class ParamsError(ProjectError, ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Value(BaseModel):
    """An immutable, hashable value: fields cannot be reassigned (copy it with model_copy(update=...) instead)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _one_line(err: ValidationError, key: str) -> str:
    """The errors of a model validated under `key` as one line, `key.field: message; ...`: for a model built inside
    another model's validator, whose own error path would otherwise lose the key."""
    return "; ".join(
        f"{'.'.join((key, *(str(p) for p in e['loc'])))}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors()
    )


# --------------------------------------------------------------------------------------------------------------
# Values other modules take: the data config, the offline model shapes, the LoRA adapter.
# --------------------------------------------------------------------------------------------------------------
class DataConfig(_Value):
    """What `prepare` builds data/prepared from (pipeline/data)."""

    seed: int = 0
    image_size: int = Field(64, ge=16)
    num_captions: int = Field(2000, ge=0)
    num_instruct: int = Field(3000, ge=0)
    num_vqa_test: int = Field(500, ge=0)
    digits_test_fraction: float = Field(0.3, gt=0, lt=1)
    text_test_fraction: float = Field(0.1, gt=0, lt=1)
    text_chunk_chars: int = Field(400, ge=20)
    text_qa_repeats: int = Field(10, ge=0)
    # Scenes told in words, with the visual questions about them, mixed into the tiny LM's pretraining (see
    # synthetic.make_scene_texts). 0 for real LLMs, which already have the skill.
    scene_texts: int = Field(0, ge=0)
    # Image-text pairs for the tiny vision tower's contrastive pretraining (stage build_base, params vision_pretrain):
    # the stand-in for the web pairs CLIP and SigLIP learnt from, since the paper's encoders come pretrained. Scenes
    # with their captions, plus the training digits as "a handwritten digit N."; split `vision_pairs`, its images
    # kept out of the test splits like every training image. 0: no such split (the tower stays random).
    vision_pairs: int = Field(0, ge=0)
    # Real data in LLaVA format (e.g. LLaVA-Pretrain 558K captions, LLaVA-665K instructions). When set, the imported
    # records replace the synthetic caption_train / instruct_train split; held-out synthetic tests stay.
    pretrain_json: str | None = None
    pretrain_image_dir: str | None = None
    instruct_json: str | None = None
    instruct_image_dir: str | None = None
    llava_json: str | None = None  # an extra LLaVA-format set, imported as its own split "imported"
    llava_image_dir: str | None = None
    llava_on_error: Literal["raise", "skip"] = "raise"
    llava_image_mode: Literal["convert", "refuse"] = "convert"
    # Absolute image paths in the LLaVA JSON taken as they are (else refused, as is any path leaving the image folder).
    # DVC tracks the image folders only: a changed file at such a path does not re-run prepare.
    llava_absolute_image_paths: bool = False
    # Processes that validate LLaVA records (each decodes its records' images once). null: every CPU core. The
    # prepared bytes do not depend on it.
    num_proc: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _image_dirs_need_their_json(self):
        for prefix in ("llava", "pretrain", "instruct"):
            if getattr(self, f"{prefix}_image_dir") is not None and getattr(self, f"{prefix}_json") is None:
                raise ValueError(f"{prefix}_image_dir is set but {prefix}_json is not")
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a mapping (e.g. params.yaml), rejecting unknown keys."""
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"unknown DataConfig keys: {unknown}; known keys: {sorted(cls.model_fields)}")
        return cls(**values)

    def processes(self) -> int:
        return self.num_proc or os.cpu_count() or 1

    def content_fields(self) -> dict[str, Any]:
        """The fields that shape the prepared bytes (num_proc only changes how fast they are made)."""
        # The absolute-paths switch off refuses what was refused before it existed: left out, so the tiny default's
        # prepared bytes (its manifest) stay those of earlier commits.
        return {k: v for k, v in self.model_dump().items()
                if k != "num_proc" and not (k == "llava_absolute_image_paths" and not v)}


class ProfileSpec(_Value):
    """Shape of an offline-built LLaVA (profiles tiny and micro): a Llama decoder + a CLIP or SigLIP vision tower."""

    vision_type: Literal["clip", "siglip"] = "clip"
    image_size: int = Field(64, ge=1)
    # 4x4 patches, four image tokens per scene quadrant: a shape's outline then shows in which of its four tokens it
    # fills (a triangle leaves its top two half empty); with one token per quadrant the LM never learnt shape
    # (docs/results.md).
    patch_size: int = Field(16, ge=1)
    vision_hidden: int = Field(64, ge=1)
    vision_layers: int = Field(3, ge=2)  # features come from the second-to-last layer
    vision_heads: int = Field(4, ge=1)
    lm_hidden: int = Field(96, ge=1)
    lm_layers: int = Field(12, ge=1)
    lm_heads: int = Field(4, ge=1)
    lm_kv_heads: int = Field(4, ge=1)
    lm_intermediate: int = Field(256, ge=1)
    # The random LM's initializer_range (LlamaConfig's 0.02): a larger one gives the token embeddings a norm nearer
    # what the layers write, one lever of the study's test bed whose depth is used (docs/results.md).
    lm_init_std: float = Field(0.02, gt=0)
    vocab_size: int = Field(1024, ge=1)
    max_position: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _shapes_fit(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name, hidden, heads in (("vision", self.vision_hidden, self.vision_heads), ("lm", self.lm_hidden, self.lm_heads)):
            if hidden % heads:
                raise ValueError(f"{name}_hidden {hidden} is not divisible by {name}_heads {heads}")
        if self.lm_heads % self.lm_kv_heads:
            raise ValueError(f"lm_heads {self.lm_heads} is not divisible by lm_kv_heads {self.lm_kv_heads}")
        return self


# The offline profiles: the tiny default and the micro test model. `model.spec` overrides single fields.
PROFILES: dict[str, ProfileSpec] = {
    "tiny": ProfileSpec(),
    "micro": ProfileSpec(
        image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
        lm_hidden=32, lm_layers=2, lm_heads=2, lm_kv_heads=2, lm_intermediate=64, vocab_size=512, max_position=128,
    ),
}


class LoraSpec(_Value):
    """The peft LoRA adapter put on the selected language-model layers (pipeline/tuning.py)."""

    r: int = Field(128, ge=1)
    alpha: int = Field(256, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)


# --------------------------------------------------------------------------------------------------------------
# params.yaml, section by section
# --------------------------------------------------------------------------------------------------------------
class ModelParams(_Strict):
    profile: Literal["tiny", "micro", "hf"] = "tiny"
    spec: dict[str, int | float | str] = {}  # overrides of the tiny/micro shape (fields of ProfileSpec)
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
            try:
                self.profile_spec()  # unknown or bad shape fields fail here, at load time
            except ValidationError as err:  # pydantic passes a nested ValidationError on as-is, without the key path
                raise ValueError(_one_line(err, "spec")) from None
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
        unknown = sorted(set(self.spec) - set(ProfileSpec.model_fields))
        if unknown:
            raise ValueError(f"spec: unknown field(s) {unknown}; expected some of {sorted(ProfileSpec.model_fields)}")
        return ProfileSpec(**(PROFILES[self.profile].model_dump() | self.spec))  # validated, unlike model_copy


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
            raise ParamsError(
                f"global_batch_size {self.global_batch_size} is not a multiple of batch_size {self.batch_size} x "
                f"{processes} processes; change batch_size or the number of processes"
            )
        return self.global_batch_size // per_step


class LMPretrainParams(_Strict):
    """Tiny profile only: pretrain the tiny LM on text so there is text ability to preserve."""

    lr: float = Field(3e-3, gt=0)
    seq_len: int = Field(128, ge=8)
    train: TrainParams = TrainParams(max_steps=600, batch_size=16)
    # A test bed whose depth is used (issue 20): build_base fails when the pretrained LM's median decoder layer has
    # less than this share of its largest layer's Block Influence on held-out text (metrics/base.json
    # lm_bi_median_to_max; published LLM profiles: 0.12-0.18). null: recorded, not gated.
    min_bi_median_to_max: float | None = Field(None, gt=0, le=1)


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
    # The training seed (data order, dropout, LoRA init); null: the top-level `seed`. Runs that differ only in it are
    # one selection's seed replicas: the report averages them and its intervals cover the seeds (pipeline/intervals.py).
    train_seed: int | None = None

    def training_seed(self, default: int) -> int:
        return default if self.train_seed is None else self.train_seed

    def replica_key(self) -> str:
        """The run's entry without its training seed: equal for the seed replicas of one selection."""
        return repr(sorted(self.model_dump(exclude={"train_seed"}).items()))

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

    def replicas(self, default_seed: int) -> dict[str, list[str]]:
        """Each selection's seed replicas: the selection's name (its entry without a train_seed, else its first in
        params order) -> the names of its runs, ordered by training seed (`default_seed`: the top-level seed). A run
        without replicas is a selection of one."""
        groups: dict[str, list[str]] = {}
        first: dict[str, str] = {}
        runs = self.all_runs()
        for name, run in runs.items():
            groups.setdefault(first.setdefault(run.replica_key(), name), []).append(name)
        out = {}
        for names in groups.values():
            named = next((n for n in names if runs[n].train_seed is None), names[0])  # the entry without a seed
            out[named] = sorted(names, key=lambda n: runs[n].training_seed(default_seed))
        return out

    def run(self, name: str) -> TuneRun:
        runs = self.all_runs()
        if name not in runs:
            raise ParamsError(f"--run {name!r}: no such entry in tune.runs or tune.importance_runs (have {sorted(runs)})")
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


class BenchmarksParams(_Strict):
    """The published benchmarks (pipeline/benchmarks, docs/benchmarks.md), run through lm-evaluation-harness on the
    tuned and pruned model of each run. `tasks`: shipped tasks or groups (pope, pope_random, gqa, textvqa_val,
    scienceqa_img, mmbench_dev_en, mmbench_dev_en_circular, mme, seedbench_img, mmlu_csv; tiny_probes, the tiny world's
    visual probes), read from their files under
    `data_dir`, or any of lm-eval's own tasks (mmlu, bbh, ceval-valid, cmmlu, mmmu_val, ...), read from the Hugging
    Face datasets cache offline. Empty: no benchmark (the default)."""

    tasks: list[str] = []
    data_dir: str = "data/benchmarks"
    limit: int | None = Field(None, ge=1)  # questions per task (null: all); for a quick check, not for results
    num_fewshot: int | None = Field(None, ge=0)  # null: each task's own default (0 for the shipped ones)
    batch_size: int = Field(8, ge=1)
    on_missing: Literal["fail", "skip"] = "fail"  # a task whose files are missing: fail evaluate, or skip it

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks):
        repeated = sorted({t for t in tasks if tasks.count(t) > 1})
        if repeated:
            raise ValueError(f"tasks listed twice: {repeated}")
        if any(not t.strip() for t in tasks):
            raise ValueError("task names must not be empty")
        return tasks


class EvaluateParams(_Strict):
    max_new_tokens: int = Field(6, ge=1)
    batch_size: int = Field(32, ge=1)
    vqa_samples: int = Field(300, ge=1)
    digits_samples: int = Field(200, ge=1)
    text_qa_samples: int = Field(200, ge=1)
    text_ppl_chunks: int = Field(100, ge=1)
    benchmarks: BenchmarksParams = BenchmarksParams()


class MlflowParams(_Strict):
    experiment: str = "visual-region"


class RegistryParams(_Strict):
    """The MLflow model registry (stage `register`): every run's checkpoints of the listed kinds become versions of
    `<model_name>-<run>[-tuned]` with alias `challenger`; `champion` only when both retentions (score / the `all`
    run's tuned score) reach their thresholds, and so does the retention on each benchmark score named in
    `min_benchmark_retention` (pipeline/benchmark_scores.py: `<task>.<metric>`, a task with one score, or an average;
    e.g. {visual_average: 0.95, mmlu: 1.0}). Empty: no benchmark gate (the default)."""

    enabled: bool = True
    model_name: str = Field("visual-region", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kinds: list[Literal["pruned", "tuned"]] = Field(["pruned"], min_length=1)
    min_visual_retention: float = Field(0.9, ge=0, le=1)
    min_text_retention: float = Field(0.9, ge=0)
    min_benchmark_retention: dict[str, float] = {}

    @field_validator("min_benchmark_retention")
    @classmethod
    def _benchmark_floors(cls, floors):
        for key, floor in floors.items():
            if not key.strip() or key != key.strip() or key.startswith(".") or key.endswith("."):
                raise ValueError(f"{key!r} is not a benchmark score name (`<task>` or `<task>.<metric>`)")
            if not floor >= 0:  # NaN too
                raise ValueError(f"{key}: the floor must be a number >= 0, got {floor}")
        return floors


class Params(_Strict):
    seed: int = 0
    model: ModelParams = ModelParams()
    data: DataConfig = DataConfig()
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
        runs = self.tune.all_runs()
        for names in self.tune.replicas(self.seed).values():
            seeds = [runs[name].training_seed(self.seed) for name in names]
            twins = [name for name, s in zip(names, seeds) if seeds.count(s) > 1]
            if twins:  # the same model trained twice, and counted twice in the seed intervals
                raise ValueError(f"tune: runs {twins} are the same selection with the same training seed; give each "
                                 f"replica its own train_seed")
        unknown = sorted(set(self.prune.curve.runs) - set(self.tune.all_runs()))
        if unknown:
            raise ValueError(f"prune.curve.runs: {unknown} are not tune runs")
        # Without benchmarks no run has a benchmark score; which names the configured tasks give is known from the
        # eval metrics only (groups, lm-eval's subtasks), so stage `register` checks the names against those.
        if self.registry.min_benchmark_retention and not self.evaluate.benchmarks.tasks:
            gated = sorted(self.registry.min_benchmark_retention)
            raise ValueError(f"registry.min_benchmark_retention: gates on {gated}, "
                             f"but evaluate.benchmarks.tasks is empty: no run has a benchmark score")
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
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"params file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ParamsError(f"params file {path} is not UTF-8 text: {err}") from None
    except OSError as err:  # e.g. a directory, or not readable
        raise ParamsError(f"params file {path} cannot be read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"params file {path} is not valid YAML: {err}") from None
    return validate(raw, str(path))
