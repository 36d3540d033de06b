"""Benchmark evaluation (pipeline/benchmarks): the published files read, missing files refused or skipped before any
model is loaded, and real lm-eval runs of a visual and a text task on the micro model, offline."""

from __future__ import annotations

import json
import logging

import pytest

import benchmark_files
from pipeline.benchmarks import catalog, loaders, runner, scoring
from pipeline.config import BenchmarksParams, EvaluateParams, ParamsError, validate


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return benchmark_files.write_all(tmp_path_factory.mktemp("benchmarks"))


# ---------------------------------------------------------------------------------------------------- the files
@pytest.mark.parametrize("task, count", [
    ("pope_random", 4), ("gqa", 4), ("textvqa_val", 4),
    ("scienceqa_img", 4),  # the question without an image and the train question are left out
    ("mmbench_dev_en", 4), ("mmbench_dev_en_circular", 4 + 4 + 4 + 3),  # one rotation per option; the last row has 3
    ("mme", 12),  # 3 categories x 2 images x 2 questions, both MME layouts
    ("seedbench_img", 4),  # the video question is left out
])
def test_each_benchmark_reads_its_published_files(bench_dir, task, count):
    records = loaders.LOADERS[task](bench_dir)
    assert len(records) == count
    for record in records:
        assert loaders.open_image(record).mode == "RGB"


def test_loaders_keep_answers_and_rotate_options(bench_dir):
    textvqa = loaders.load_textvqa(bench_dir)[0]
    assert len(textvqa["answers"]) == 10
    sqa = {r["question_id"]: r for r in loaders.load_scienceqa_img(bench_dir)}
    assert sqa["101"]["options"] == ["red", "blue", "green"] and sqa["101"]["answer"] == "B"
    rotations = [r for r in loaders.load_mmbench(bench_dir, circular=True) if r["question_id"] == "1"]
    # the right option text stays the right one in every rotation
    assert {r["options"][scoring.LETTERS.index(r["answer"])] for r in rotations} == {"blue"}
    assert len({tuple(r["options"]) for r in rotations}) == 4
    mmlu = loaders.load_mmlu_csv(bench_dir)
    assert len(mmlu["test"]) == 6 and len(mmlu["dev"]) == 4 and mmlu["test"][0]["options"][2] == "green, or grey"


def test_a_record_outside_the_published_format_names_the_file(bench_dir, tmp_path):
    benchmark_files.write_pope(tmp_path)
    path = tmp_path / "pope" / "coco_pope_random.json"
    path.write_text(path.read_text().replace('"label": "no"', '"label": "maybe"', 1))
    with pytest.raises(loaders.BenchmarkDataError, match=r"coco_pope_random\.json: line 2: label must be yes or no"):
        loaders.load_pope(tmp_path, "random")


# -------------------------------------------------------------------------------------- missing files: fail or skip
def test_missing_files_fail_with_one_line_naming_task_and_path_before_loading(tmp_path, monkeypatch):
    import pipeline.model

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the files were checked")

    monkeypatch.setattr(pipeline.model, "load_vlm", no_loading)
    benchmark_files.write_gqa(tmp_path)
    params = BenchmarksParams(tasks=["gqa", "pope"], data_dir=str(tmp_path))
    with pytest.raises(catalog.BenchmarkFilesError) as err:
        runner.run_benchmarks(tmp_path / "no-model", params)
    message = str(err.value)
    assert "\n" not in message
    assert "benchmark pope_random" in message and str(tmp_path / "pope" / "coco_pope_random.json") in message
    assert isinstance(err.value, FileNotFoundError)  # a MissingInputError: the stages exit 2 on it


def test_a_malformed_question_file_fails_before_loading_too(tmp_path):
    benchmark_files.write_gqa(tmp_path)
    (tmp_path / "gqa" / "testdev_balanced_questions.json").write_text('{"1": {"question": "?"}}')
    params = BenchmarksParams(tasks=["gqa"], data_dir=str(tmp_path), on_missing="skip")
    with pytest.raises(loaders.BenchmarkDataError, match=r"testdev_balanced_questions\.json: record 1 has no field 'imageId'"):
        runner.runnable_tasks(params)
    (tmp_path / "gqa" / "testdev_balanced_questions.json").write_text("{}")
    with pytest.raises(loaders.BenchmarkDataError, match="benchmark gqa: no questions under"):
        runner.runnable_tasks(params)


def test_on_missing_skip_warns_and_runs_the_rest(tmp_path, caplog):
    benchmark_files.write_gqa(tmp_path)
    params = BenchmarksParams(tasks=["gqa", "textvqa_val", "mmlu"], data_dir=str(tmp_path), on_missing="skip")
    with caplog.at_level(logging.WARNING, logger="pipeline.benchmarks.runner"):
        tasks = runner.runnable_tasks(params)
    assert tasks == ["gqa", "mmlu"]  # lm-eval's own tasks come from the datasets cache: not checked here
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "textvqa_val" in warnings[0] and "TextVQA_0.5.1_val.json" in warnings[0]


def test_params_default_to_no_benchmark():
    assert EvaluateParams().benchmarks.tasks == []
    assert runner.runnable_tasks(BenchmarksParams(data_dir="/nonexistent")) == []
    with pytest.raises(ParamsError, match="evaluate.benchmarks.on_missing"):
        validate({"tune": {"runs": {"all": {"strategy": "all"}}}, "evaluate": {"benchmarks": {"on_missing": "ignore"}}})
    with pytest.raises(ParamsError, match="tasks listed twice"):
        validate({"tune": {"runs": {"all": {"strategy": "all"}}}, "evaluate": {"benchmarks": {"tasks": ["gqa", "gqa"]}}})


def test_the_shipped_task_folder_defines_the_catalog():
    from lm_eval.tasks import TaskManager

    defined = set(TaskManager(include_path=str(catalog.TASKS_DIR), include_defaults=False).all_tasks)
    assert defined == set(catalog.SHIPPED) | set(catalog.GROUPS)
    assert set(loaders.LOADERS) == set(catalog.SHIPPED)


def test_kinds_and_groups():
    assert catalog.expand(["pope", "pope_random", "mmlu"]) == ["pope_random", "pope_popular", "pope_adversarial", "mmlu"]
    assert [catalog.kind(t) for t in ("gqa", "mmlu_csv", "mmmu_val", "bbh")] == ["visual", "text", "visual", "text"]
    assert runner.mlflow_metrics("tuned", {"pope_random": {"f1": 0.5}, "ceval-valid": {"acc": 0.25, "x": None}}) == {
        "tuned_bench_pope_random_f1": 0.5, "tuned_bench_ceval_valid_acc": 0.25}


# ----------------------------------------------------------------------------------------- lm-eval on the micro model
@pytest.fixture(scope="module")
def micro_run(micro_dir, bench_dir):
    params = BenchmarksParams(tasks=["pope_random", "mme", "mmlu_csv"], data_dir=str(bench_dir), batch_size=4, limit=4)
    return runner.run_benchmarks(micro_dir, params, device="cpu")


def test_visual_task_scores_follow_from_its_samples(micro_run):
    samples = micro_run["samples"]["pope_random"]
    assert len(samples) == 4
    pairs = [(scoring.pope_answer(s["filtered_resps"][0]), s["doc"]["answer"]) for s in samples]
    assert micro_run["scores"]["pope_random"] == pytest.approx(scoring.binary_metrics(pairs))
    mme = [(s["doc"]["category"], s["doc"]["image_id"], scoring.mme_answer(s["filtered_resps"][0]) == s["doc"]["answer"])
           for s in micro_run["samples"]["mme"]]
    assert micro_run["scores"]["mme"] == pytest.approx(scoring.mme_totals(scoring.mme_category_scores(mme)))


def test_visual_prompts_are_the_models_chat_template_with_the_image(micro_run, micro_dir):
    from transformers import AutoTokenizer

    from pipeline.data.chat import generation_prompt

    tokenizer = AutoTokenizer.from_pretrained(micro_dir)
    sample = micro_run["samples"]["pope_random"][0]
    prompt, gen_kwargs, visual = sample["arguments"][0]
    expected = generation_prompt(tokenizer, "<image>\n" + sample["doc"]["question"] +
                                 "\nAnswer the question using a single word or phrase.")
    assert tokenizer.bos_token + prompt == expected  # the processor adds the BOS the template starts with
    assert gen_kwargs["do_sample"] is False and len(visual["visual"]) == 1


def test_text_task_runs_with_hf_on_the_checkpoint(micro_run):
    samples = micro_run["samples"]["mmlu_csv"]
    assert len(samples) == 4 and all(len(s["resps"]) == 4 for s in samples)  # one log-likelihood per option
    right = [max(range(4), key=lambda k: s["filtered_resps"][k][0]) == s["doc"]["answer"] for s in samples]
    assert micro_run["scores"]["mmlu_csv"]["acc"] == pytest.approx(sum(right) / len(right))
    assert micro_run["results"]["text"]["results"]["mmlu_csv"]["acc,none"] == micro_run["scores"]["mmlu_csv"]["acc"]


def test_each_task_reports_the_metrics_the_catalog_names(micro_run):
    tasks = {task: set(m) for task, m in micro_run["scores"].items() if not task.endswith("_average")}
    assert tasks == {task: set(catalog.SHIPPED[task].metrics) for task in ("pope_random", "mme", "mmlu_csv")}


def test_the_run_carries_the_visual_and_text_averages_of_its_headline_scores(micro_run):
    scores = micro_run["scores"]
    mme = (scores["mme"]["perception"] + scores["mme"]["cognition"]) / 2800
    assert scores["visual_average"] == {"mean": pytest.approx((scores["pope_random"]["f1"] + mme) / 2)}
    assert scores["text_average"] == {"mean": pytest.approx(scores["mmlu_csv"]["acc"])}


def test_averages_count_a_group_once_and_skip_what_has_no_headline():
    scores = {"pope_random": {"f1": 0.9}, "pope_popular": {"f1": 0.7}, "gqa": {"exact_match": 0.5},
              "mme": {"perception": 1400.0, "cognition": None}, "mmlu": {"acc": 0.4}, "mmlu_anatomy": {"acc": 0.0},
              "bbh": {"exact_match": 0.2}}
    averages = catalog.averages(scores, ["pope", "gqa", "mme", "mmlu", "bbh"])
    assert averages["visual_average"]["mean"] == pytest.approx((0.8 + 0.5) / 2)  # POPE once; MME lacks cognition
    assert averages["text_average"]["mean"] == pytest.approx((0.4 + 0.2) / 2)  # mmlu's subtasks not counted
    assert catalog.averages({"mmlu": {"acc": 0.4}}, ["mmlu"]) == {"text_average": {"mean": 0.4}}


def test_results_are_strict_json_with_throughput(micro_run):
    json.dumps(micro_run, allow_nan=False)
    assert "image_base64" not in json.dumps(micro_run["samples"])
    for kind in ("visual", "text"):
        throughput = micro_run["throughput"][kind]
        assert throughput["samples"] > 0 and throughput["samples_per_second"] > 0


def test_scores_are_the_unfiltered_metrics_or_a_filtered_only_tasks_first_filter():
    results = {"results": {
        "mmlu": {"alias": "mmlu", "acc,none": 0.4, "acc_stderr,none": 0.01},
        "bbh_cot_fewshot_date": {"exact_match,get-answer": 0.3, "exact_match_stderr,get-answer": 0.1},
        "pope_random": {"f1,none": 0.8, "f1,strict": 0.1},
        "bbh": {"alias": "bbh"},
    }}
    assert runner._flat_scores(results) == {"mmlu": {"acc": 0.4}, "bbh_cot_fewshot_date": {"exact_match": 0.3},
                                            "pope_random": {"f1": 0.8}}
