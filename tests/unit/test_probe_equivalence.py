"""The tiny world's probes scored both ways give the same scores (issue 17): the native evaluator
(pipeline/evaluation.py's evaluate_model, what stage `evaluate` runs) and lm-evaluation-harness with the
`tiny_probes` task (pipeline/benchmarks/tiny_probes.py + tasks/tiny_probes.yaml, through run_benchmarks) on the same
prepared records, for a micro, a tiny-shaped and a trained micro model: the same prompt tokens, the same answer to
every question, the same hits sample by sample, the same per-type accuracies and visual score, exactly.

Two models are untrained, so every answer is wrong on the real records; the third is the micro one trained on the
probes, whose answers are right for some questions of every type and end where it learned to stop. The scores are
checked again on the same records with some gold answers replaced by (a variant of) the model's own answer, so that
each type has hits (and misses), with lm-eval in other batches than the native evaluator's (another batch size, and
lm-eval sorts by length: other padding in every batch)."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest

from pipeline import data, evaluation
from pipeline.benchmarks import catalog, loaders, runner, tiny_probes
from pipeline.config import BenchmarksParams, EvaluateParams
from pipeline.data.images import to_rgb

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"

DATA = {"image_size": 64, "num_captions": 4, "num_instruct": 5, "num_vqa_test": 30, "text_qa_repeats": 1,
        "digits_test_fraction": 0.95}
# both sides' evaluate params: the task's own max_new_tokens; batches of 8, the last one short
CFG = EvaluateParams(max_new_tokens=tiny_probes.max_gen_toks(), batch_size=8, vqa_samples=30, digits_samples=12,
                     text_qa_samples=2, text_ppl_chunks=2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    data.prepare_all(data.DataConfig(**DATA), out)
    return out


def evaluation_sets(prepared, cfg) -> dict:
    """evaluation_sets of the prepared data, read back from disk as stage `evaluate` reads it."""
    read = {name: datasets.load_from_disk(str(prepared / name)) for name in (data.VISUAL_DIR, data.TEXT_DIR, data.TEXT_QA_DIR)}
    return evaluation.evaluation_sets(read[data.VISUAL_DIR], read[data.TEXT_DIR], read[data.TEXT_QA_DIR], cfg)


@pytest.fixture(scope="module")
def sets(prepared):
    return evaluation_sets(prepared, CFG)


def probes(sets) -> list[dict]:
    return sets["vqa"] + sets["digits"]


def native(vlm, processor, sets) -> tuple[dict, list[str]]:
    """evaluate_model's result and the answers its decoder gave to the probes, in order."""
    answers: list[str] = []
    generate = evaluation._generate

    def recording(model, inputs, max_new_tokens, tokenizer):
        out = generate(model, inputs, max_new_tokens, tokenizer)
        answers.extend(out[0])
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "_generate", recording)
        result = evaluation.evaluate_model(vlm, processor, sets, CFG, seq_len=32)
    return result, answers[: len(probes(sets))]  # then the text QA answers


def with_lm_eval(model_dir, vlm, processor, sets, bench_dir, *, batch_size: int) -> dict:
    tiny_probes.export(sets, bench_dir, max_new_tokens=CFG.max_new_tokens)
    params = BenchmarksParams(tasks=["tiny_probes"], data_dir=str(bench_dir), batch_size=batch_size)
    return runner.run_benchmarks(model_dir, params, loaded=(vlm, processor), device="cpu")


def relabelled(sets, answers: list[str]) -> dict:
    """The same records with a gold answer that normalises to the model's answer for two in three of each type (one
    with punctuation and spaces added), the gold kept for the third: every type has hits and misses."""
    seen: dict[str, int] = {}
    golds = []
    for record, answer in zip(probes(sets), answers, strict=True):
        k = seen[record["qtype"]] = seen.get(record["qtype"], -1) + 1
        golds.append([answer + ".", record["conversations"][1]["value"], f"  {answer.upper()} !"][k % 3])
    golds = iter(golds)

    def copy(record):
        question, _ = record["conversations"]
        return record | {"conversations": [question, {"from": "gpt", "value": next(golds)}]}

    vqa = [copy(r) for r in sets["vqa"]]
    return sets | {"vqa": vqa, "digits": [copy(r) for r in sets["digits"]]}


def trained(micro_dir, sets, out: Path) -> Path:
    """The micro checkpoint tuned (projector and both layers, 200 steps, about 5 s) on the probes themselves, saved
    under `out`: a model that answers some questions of every type right and ends its answers itself, unlike an
    untrained one that decodes max_new_tokens of noise."""
    import pipeline.model
    from pipeline import tuning
    from pipeline.config import TrainParams
    from pipeline.training import train_visual

    vlm, processor = pipeline.model.load_vlm(micro_dir)
    records = datasets.Dataset.from_list([{key: r[key] for key in ("id", "image", "qtype", "conversations")}
                                          for r in probes(sets)], features=data.VISUAL_FEATURES)
    tuned, _, _ = train_visual(
        vlm, processor, records, trainability=tuning.Trainability(projector="full", layers=(0, 1)), projector_lr=3e-3,
        lm_lr=3e-3, params=TrainParams(max_steps=200, batch_size=8, max_length=64, save_steps=10**6, logging_steps=50),
        ckpt_dir=out / "checkpoints", seed=0, fingerprint={"test": "trained probes"})
    pipeline.model.save_vlm(tuned, processor, out / "trained")
    return out / "trained"


@pytest.fixture(scope="module", params=["micro", "tiny", "trained"])
def model_dir(request, micro_dir, sets, tmp_path_factory):
    """The micro checkpoint, an untrained one of the tiny profile's shape (what `make repro` trains), and the micro
    one trained on the probes."""
    from conftest import build_micro

    import pipeline.model

    if request.param == "micro":
        return micro_dir
    if request.param == "trained":
        return trained(micro_dir, sets, tmp_path_factory.mktemp("trained"))
    return build_micro(tmp_path_factory.mktemp("tiny"), **pipeline.model.PROFILES["tiny"].model_dump())


@pytest.fixture(scope="module")
def runs(model_dir, sets, tmp_path_factory):
    """{"records": (native result, native answers, lm-eval run), "relabelled": (...)}: lm-eval in batches of 8 on
    the records, of 5 on the relabelled ones."""
    import pipeline.model

    vlm, processor = pipeline.model.load_vlm(model_dir)
    out = {}
    for name, batch_size in (("records", CFG.batch_size), ("relabelled", 5)):
        probe_sets = sets if name == "records" else relabelled(sets, out["records"][1])
        result, answers = native(vlm, processor, probe_sets)
        run = with_lm_eval(model_dir, vlm, processor, probe_sets, tmp_path_factory.mktemp(name), batch_size=batch_size)
        out[name] = (result, answers, run)
    return out


def test_the_export_is_the_native_records_in_order(sets, tmp_path):
    tiny_probes.export(sets, tmp_path)
    records = loaders.read("tiny_probes", tmp_path)["test"]
    expected = [("vqa", r) for r in sets["vqa"]] + [("digits", r) for r in sets["digits"]]
    assert [(r["set"], r["id"], r["qtype"], r["question"], r["answer"]) for r in records] == [
        (s, r["id"], r["qtype"], r["conversations"][0]["value"], r["conversations"][1]["value"]) for s, r in expected]
    for record, (_, r) in zip(records, expected):  # the pixels the native path feeds the processor
        assert np.array_equal(np.asarray(loaders.open_image(record)), np.asarray(to_rgb(r["image"])))
    assert {r["qtype"] for r in records} == set(tiny_probes.TYPES)  # every type is asked


def test_the_export_refuses_another_max_new_tokens(sets, tmp_path):
    with pytest.raises(tiny_probes.ProbeExportError, match=f"decodes {CFG.max_new_tokens} tokens"):
        tiny_probes.export(sets, tmp_path, max_new_tokens=CFG.max_new_tokens + 1)
    assert not (tmp_path / "tiny_probes").exists()


def test_the_task_decodes_the_tiny_params_max_new_tokens():
    from pipeline import config

    assert tiny_probes.max_gen_toks() == config.load(PARAMS).evaluate.max_new_tokens == EvaluateParams().max_new_tokens


def test_the_command_exports_the_sets_the_params_give(prepared, tmp_path, capsys):
    from pipeline import config

    path = tiny_probes.main(["--params", str(PARAMS), "--prepared", str(prepared), "--out", str(tmp_path)])
    assert path == tmp_path / "tiny_probes" / "probes.jsonl" and "VQA and" in capsys.readouterr().out
    expected = probes(evaluation_sets(prepared, config.load(PARAMS).evaluate))
    assert [r["id"] for r in loaders.read("tiny_probes", tmp_path)["test"]] == [r["id"] for r in expected]
    assert not catalog.missing_files(["tiny_probes"], tmp_path)


def test_both_evaluators_prompt_the_same_tokens(runs, model_dir, sets):
    from transformers import AutoProcessor

    from pipeline.data.chat import processor_inputs

    processor = AutoProcessor.from_pretrained(model_dir)
    for sample, record in zip(runs["records"][2]["samples"]["tiny_probes"], probes(sets), strict=True):
        prompt, gen_kwargs, visual = sample["arguments"][0]
        native_ids = processor_inputs(processor, [record], with_answers=False, padding_side="left")["input_ids"][0]
        # lm-eval's hf-multimodal encoding (tok_batch_multimodal_encode): the processor on the rendered prompt
        lm_eval_ids = processor(images=[to_rgb(record["image"])], text=[prompt], return_tensors="pt")["input_ids"][0]
        assert lm_eval_ids.tolist() == native_ids.tolist()
        assert gen_kwargs["max_gen_toks"] == CFG.max_new_tokens and gen_kwargs["do_sample"] is False


@pytest.mark.parametrize("name", ["records", "relabelled"])
def test_both_evaluators_give_the_same_answers_hits_and_scores(runs, model_dir, name):
    result, answers, run = runs[name]
    samples = run["samples"]["tiny_probes"]
    assert [s["doc_id"] for s in samples] == list(range(len(answers)))
    assert [s["filtered_resps"][0] for s in samples] == answers  # answer by answer
    hits: dict[str, str] = {}
    for s in samples:
        _, qtype, hit = s["visual_score"]
        hits[qtype] = hits.get(qtype, "") + str(hit)
    assert hits == result["samples"]["visual"]  # sample by sample, per question type, in order
    scores = run["scores"]["tiny_probes"]
    assert set(scores) == set(catalog.SHIPPED["tiny_probes"].metrics)
    assert {q: scores[q] for q in result["per_type"]} == result["per_type"]  # exactly, not approximately
    assert scores["visual_score"] == result["visual_score"]
    assert (scores["vqa_accuracy"], scores["digits_accuracy"]) == (result["vqa_accuracy"], result["digits_accuracy"])
    if name == "relabelled":  # the scores say something: each type has hits (and, untrained, misses: the kept golds)
        assert answers == runs["records"][1]  # the golds changed, not the answers
        assert all(accuracy > 0 for accuracy in result["per_type"].values())
        if model_dir.name != "trained":
            assert all(accuracy < 1 for accuracy in result["per_type"].values())


def test_the_trained_model_answers_some_probes_of_every_type(runs, model_dir):
    if model_dir.name != "trained":
        pytest.skip("the untrained checkpoints answer every real probe wrong")
    result, answers, _ = runs["records"]
    assert all(0 < accuracy < 1 for accuracy in result["per_type"].values()), result["per_type"]
    assert sum(len(a.split()) < 3 for a in answers) > len(answers) / 2  # short answers: it learned where to stop
