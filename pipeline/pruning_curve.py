"""The pruning curve of one tuned run: its visual and text scores after removing 0..n decoder layers, the least
important first by the run's own per-layer scores. A selective run's tuned layers (its visual region) are protected;
a run that tuned every layer (`all`) has no region, so it gets conventional pruning: the paper's comparison.
Optionally each cut model is healed by a short tune of the run's own trainable set and scored again (an extension:
the paper describes no healing)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets

from pipeline import pruning
from pipeline.config import TuneParams, TuneRun

# What each point keeps of evaluate_model: the scores, and which samples were right (the report's intervals).
SCORES = ("visual_score", "text_qa_accuracy", "text_ppl", "samples")


@dataclass
class Healing:
    """The healing tune after each cut: `steps` steps of tune's optimiser settings (`tune`: the tune params) with
    the trainability of the run's params entry `run`, on `data` (named `data_name` in errors), resumable from
    checkpoints under `ckpt_dir` (removed once each healed model is scored)."""

    run: TuneRun
    tune: TuneParams
    steps: int
    seed: int
    data: datasets.Dataset  # the visual instruction data
    data_name: str
    ckpt_dir: Path


def heal(model, processor, healing: Healing, name: str, protected: list[int], kept: list[int], ckpt: Path):
    """Tune the cut model with run `name`'s trainability: its region (remapped to the kept layers' new indices) or,
    with nothing protected (`all`), every kept layer. Returns (the healed model, the decoder layers it trained)."""
    from pipeline import training
    from pipeline.tuning import Trainability

    spec, cfg = healing.run, healing.tune
    layers = pruning.remap_layers(kept, protected) if protected else range(len(kept))
    trainability = Trainability(projector=spec.projector, language_model=spec.language_model, layers=tuple(layers),
                                embeddings=cfg.embeddings, lm_head=cfg.lm_head, lora=cfg.lora)
    train = cfg.train.model_copy(update={"max_steps": healing.steps})
    healed, _, report = training.train_visual(
        model, processor, healing.data, trainability=trainability, projector_lr=cfg.projector_lr, lm_lr=cfg.lm_lr,
        params=train, ckpt_dir=ckpt, seed=healing.seed,
        fingerprint={"stage": "heal", "run": name, "kept": kept, "train": train.model_dump()},
        data_name=healing.data_name, params_key="tune.train",
    )
    return healed, report["trained_layers"]


def pruning_curve(name: str, scores: list[float], region: list[int], *, max_layers: int, load_model, evaluate,
                  healing: Healing | None = None) -> list[dict]:
    """The curve of run `name`: one point per number of removed layers k = 0..max_layers, while at least one
    unprotected layer stays. `scores`: the run's per-layer importance (the prune metric); `region`: its tuned layers;
    `load_model()`: a fresh copy of the tuned model and its processor; `evaluate(model, processor)`: its scores
    (pipeline.evaluation.evaluate_model)."""
    protected = [] if len(region) == len(scores) else region
    points = []
    for k in range(max_layers + 1):
        if k > len(scores) - len(protected) - 1:
            break  # at least one unprotected layer stays
        removed = pruning.choose_layers_to_prune(scores, k, protected) if k else []
        model, processor = load_model()
        if removed:
            pruning.remove_layers(model, removed, protected=protected)
        result = evaluate(model, processor)
        point = {"removed_layers": k, "removed": removed, "mode": "protected" if protected else "conventional",
                 **{m: result[m] for m in SCORES}}
        if healing and removed:
            kept = [i for i in range(len(scores)) if i not in removed]
            ckpt = healing.ckpt_dir / f"{name}-{k}"
            model, trained = heal(model, processor, healing, name, protected, kept, ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
            healed = {m: evaluate(model, processor)[m] for m in SCORES}
            point["healed"] = healed | {"trained_layers": trained, "steps": healing.steps}
        points.append(point)
    return points


def curve_csv(curves: dict[str, list[dict]]) -> str:
    """Every run's curve as DVC plot data; healed_visual_score is empty where there was no healing."""
    rows = [f"{name},{p['removed_layers']},{p['visual_score']},{p['text_qa_accuracy']},{p['text_ppl']},"
            f"{p['healed']['visual_score'] if 'healed' in p else ''}\n" for name, points in curves.items() for p in points]
    return "run,removed_layers,visual_score,text_qa_accuracy,text_ppl,healed_visual_score\n" + "".join(rows)
