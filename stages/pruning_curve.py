"""Stage `pruning_curve`: the visual and text scores of each run in `prune.curve.runs` after removing 0..n layers,
ranked by the run's own importance scores (its prune stage wrote them). A selective run's tuned layers are
protected; the `all` run has no region, so it gets conventional pruning: the paper's comparison. With `prune.curve.heal_steps`, each cut model is also healed by a
short tune of the run's own trainable set and scored again.

    python -m stages.pruning_curve
"""

import json
import shutil
from pathlib import Path

from stages._common import load_params, run, torch_dtype
from stages.evaluate import evaluate_model, evaluation_sets


SCORES = ("visual_score", "text_qa_accuracy", "text_ppl")


def heal(model, processor, params, name: str, protected: list[int], kept: list[int], ckpt: Path):
    """Tune the cut model for `prune.curve.heal_steps` steps with run `name`'s trainability: its region (remapped
    to the kept layers' new indices) or, with nothing protected (`all`), every kept layer. Returns (the healed
    model, the decoder layers it trained)."""
    import datasets

    from pipeline import pruning, training as T
    from pipeline.tuning import Trainability

    spec, cfg = params.tune.run(name), params.tune
    layers = pruning.remap_layers(kept, protected) if protected else range(len(kept))
    trainability = Trainability(projector=spec.projector, language_model=spec.language_model, layers=tuple(layers),
                                embeddings=cfg.embeddings, lm_head=cfg.lm_head, lora=cfg.lora)
    train = cfg.train.model_copy(update={"max_steps": params.prune.curve.heal_steps})
    data = datasets.load_from_disk("data/prepared/visual")["instruct_train"]
    healed, _, report = T.train_visual(
        model, processor, data, trainability=trainability, projector_lr=cfg.projector_lr, lm_lr=cfg.lm_lr, params=train,
        ckpt_dir=ckpt, seed=params.seed, fingerprint={"stage": "heal", "run": name, "kept": kept, "train": train.model_dump()},
        data_name="data/prepared/visual, split 'instruct_train'", params_key="tune.train",
    )
    return healed, report["trained_layers"]


def main(argv: list[str]) -> None:
    from pipeline import model as M, pruning
    from pipeline.storage import atomic_write_json, atomic_write_text

    params = load_params()
    cfg = params.prune
    sets = evaluation_sets(params)
    curves, rows = {}, []
    for name in cfg.curve.runs:
        tuned = Path(f"models/tuned/{name}")
        scores = json.loads(Path(f"plots/importance/{name}.json").read_text())[cfg.metric]
        region = json.loads((tuned / "selection.json").read_text())["layers"]
        protected = [] if len(region) == len(scores) else region
        points = []
        for k in range(cfg.curve.max_layers + 1):
            if k > len(scores) - len(protected) - 1:
                break  # at least one unprotected layer stays
            removed = pruning.choose_layers_to_prune(scores, k, protected) if k else []
            model, processor = M.load_vlm(tuned, dtype=torch_dtype(params.model.dtype))
            if removed:
                pruning.remove_layers(model, removed, protected=protected)
            res = evaluate_model(model, processor, params, sets)
            point = {"removed_layers": k, "removed": removed, "mode": "protected" if protected else "conventional",
                     **{m: res[m] for m in SCORES}}
            healed = {}
            if cfg.curve.heal_steps and removed:
                kept = [i for i in range(len(scores)) if i not in removed]
                ckpt = Path(f"checkpoints/heal/{name}-{k}")
                model, trained = heal(model, processor, params, name, protected, kept, ckpt)
                shutil.rmtree(ckpt, ignore_errors=True)
                healed = {m: evaluate_model(model, processor, params, sets)[m] for m in SCORES}
                point["healed"] = healed | {"trained_layers": trained, "steps": cfg.curve.heal_steps}
            points.append(point)
            rows.append(f"{name},{k},{res['visual_score']},{res['text_qa_accuracy']},{res['text_ppl']},"
                        f"{healed.get('visual_score', '')}\n")
        curves[name] = points
    atomic_write_json("metrics/pruning_curve.json", curves)
    atomic_write_text("plots/pruning_curve.csv", "run,removed_layers,visual_score,text_qa_accuracy,text_ppl,healed_visual_score\n" + "".join(rows))


if __name__ == "__main__":
    run(main)
