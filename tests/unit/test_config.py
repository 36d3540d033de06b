"""The params schema: every shipped params file validates; every mistake is a ParamsError naming its dotted key.

Longer than 400 lines on purpose: it mirrors pipeline/config.py, the whole schema, one group of tests per section."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.selection import select_layers

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([ROOT / "params.yaml", *(ROOT / "params").glob("*.yaml")])


@pytest.fixture(scope="module")
def base() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def mutate(base: dict, fn) -> dict:
    raw = copy.deepcopy(base)
    fn(raw)
    return raw


def invalid(raw: dict, match: str) -> str:
    with pytest.raises(config.ParamsError, match=match) as err:
        config.validate(raw, "x.yaml")
    assert str(err.value).startswith("invalid params in x.yaml:")
    return str(err.value)


def add_run(raw: dict, name: str = "x", **run) -> None:
    raw["tune"]["runs"][name] = run


# ---------------------------------------------------------------------------------------------------- shipped files
def test_shipped_files_found():
    names = {p.name for p in SHIPPED}
    assert "params.yaml" in names and len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_params_validate(path):
    params = config.load(path)
    assert isinstance(params, config.Params)
    assert "all" in params.tune.runs
    assert params.tune.runs["all"].strategy == "all"
    if params.model.profile != "hf":
        spec = params.model.profile_spec()
        for name, run in params.tune.runs.items():
            if run.strategy != "importance":
                layers = select_layers(spec.lm_layers, run.strategy, run.budget, seed=run.seed)
                assert layers, name


def test_default_params_yaml():
    params = config.load(ROOT / "params.yaml")
    assert params.model.profile == "tiny"
    assert params.tune.runs["uniform25"].budget == 0.25
    assert params.tune.runs["uniform25"].language_model == "full"


def test_micro_params_shape():
    params = config.load(ROOT / "params" / "micro.yaml")
    spec = params.model.profile_spec()
    assert spec.lm_layers == 4 and spec.lm_hidden == 32
    assert params.tune.lora.r == 4 and params.tune.lora.dropout == 0.0
    assert params.tune.runs["lora_bottom1"].budget == 1 and isinstance(params.tune.runs["lora_bottom1"].budget, int)
    assert select_layers(4, "uniform", params.tune.runs["uniform50"].budget) == [1, 3]


def test_llava_params_match_the_paper():
    params = config.load(ROOT / "params" / "llava-1.5-7b.yaml")
    assert params.model.profile == "hf" and params.model.dtype == "bfloat16"
    assert (params.tune.lora.r, params.tune.lora.alpha) == (128, 256)
    run = params.tune.runs["uniform25"]
    assert run.language_model == "lora"
    assert select_layers(32, run.strategy, run.budget) == [1, 5, 9, 13, 19, 23, 27, 31]


def test_minimal_params_use_defaults():
    params = config.validate({"tune": {"runs": {"all": {"strategy": "all"}}}}, "x.yaml")
    assert params.model.profile == "tiny"
    assert params.tune.train.max_steps == 200
    assert params.prune.metric == "angular"


# ---------------------------------------------------------------------------------------------------- unknown keys
def test_unknown_top_level_key(base):
    invalid(mutate(base, lambda r: r.update(foo=1)), r"\n  foo: unknown key")


def test_unknown_nested_key(base):
    invalid(mutate(base, lambda r: r["tune"]["train"].update(foo=1)), r"tune\.train\.foo: unknown key")


@pytest.mark.parametrize(
    "path",
    [("model", "foo"), ("data", "foo"), ("lm_pretrain", "train", "foo"), ("pretrain_projector", "foo"),
     ("tune", "lora", "foo"), ("prune", "foo"), ("evaluate", "foo"), ("mlflow", "foo")],
)
def test_unknown_keys_everywhere(base, path):
    def fn(r):
        node = r
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = 1

    invalid(mutate(base, fn), re.escape(".".join(path)) + ": unknown key")


def test_unknown_key_in_a_run(base):
    invalid(mutate(base, lambda r: add_run(r, strategy="top", budgt=0.5)), r"tune\.runs\.x\.budgt: unknown key")


def test_unknown_spec_field(base):
    invalid(mutate(base, lambda r: r["model"].update(spec={"lm_layerz": 4})), r"model: .*unknown field\(s\) \['lm_layerz'\]")


# ---------------------------------------------------------------------------------------------------- types / values
def test_wrong_type(base):
    invalid(mutate(base, lambda r: r["tune"]["train"].update(max_steps="abc")), r"tune\.train\.max_steps: .*valid integer")


@pytest.mark.parametrize(
    "section, key, value",
    [
        (("tune", "train"), "max_steps", -1),
        (("tune", "train"), "max_steps", 1.5),
        (("tune", "train"), "batch_size", 0),
        (("tune", "train"), "warmup_ratio", 1.0),
        (("tune", "train"), "on_overflow", "drop"),
        (("tune",), "lm_lr", 0),
        (("tune",), "projector_lr", -1e-3),
        (("prune",), "metric", "cosine"),
        (("prune",), "num_layers", 0),
        (("model",), "dtype", "float64"),
        (("model",), "profile", "huge"),
        (("evaluate",), "max_new_tokens", 0),
    ],
)
def test_bad_values_name_the_key(base, section, key, value):
    def fn(r):
        node = r
        for s in section:
            node = node[s]
        node[key] = value

    invalid(mutate(base, fn), re.escape(".".join((*section, key))) + ": ")


@pytest.mark.parametrize(
    "budget, match",
    [
        (1.5, r"tune\.runs\.x\.budget: .*budget ratio must be in \(0, 1\], got 1\.5"),
        (0, r"tune\.runs\.x\.budget: .*budget count must be >= 1, got 0"),
        (0.0, r"tune\.runs\.x\.budget: .*budget ratio must be in \(0, 1\], got 0\.0"),
        (-1, r"tune\.runs\.x\.budget: .*budget count must be >= 1, got -1"),
        (float("nan"), r"tune\.runs\.x\.budget: .*budget ratio must be in \(0, 1\]"),
        ("abc", r"tune\.runs\.x\.budget"),
    ],
)
def test_bad_budget(base, budget, match):
    invalid(mutate(base, lambda r: add_run(r, strategy="uniform", budget=budget)), match)


def test_bool_budget_is_rejected(base):
    invalid(mutate(base, lambda r: add_run(r, strategy="uniform", budget=True)), r"tune\.runs\.x\.budget")


def test_budget_int_vs_float_kept(base):
    raw = mutate(base, lambda r: (add_run(r, "one", strategy="bottom", budget=1), add_run(r, "every", strategy="bottom", budget=1.0)))
    runs = config.validate(raw, "x.yaml").tune.runs
    assert runs["one"].budget == 1 and type(runs["one"].budget) is int
    assert runs["every"].budget == 1.0 and type(runs["every"].budget) is float


def test_unknown_strategy(base):
    invalid(mutate(base, lambda r: add_run(r, strategy="middle")), r"tune\.runs\.x\.strategy: .*unknown strategy 'middle'")


def test_explicit_list_strategy_accepted(base):
    params = config.validate(mutate(base, lambda r: add_run(r, strategy=[1, 5, 9])), "x.yaml")
    assert params.tune.runs["x"].strategy == [1, 5, 9]


def test_bad_language_model_mode(base):
    invalid(mutate(base, lambda r: add_run(r, strategy="top", language_model="partial")), r"tune\.runs\.x\.language_model: ")


# ---------------------------------------------------------------------------------------------------- runs
def test_missing_all_run(base):
    invalid(mutate(base, lambda r: r["tune"]["runs"].pop("all")), r"tune\.runs: .*needs an 'all' run")


def test_all_run_must_train_every_layer(base):
    invalid(mutate(base, lambda r: r["tune"]["runs"].update(all={"strategy": "uniform"})), r"tune\.runs\.all")


def test_no_runs(base):
    invalid(mutate(base, lambda r: r["tune"].update(runs={})), r"tune\.runs: .*at least one tune run")


def test_missing_tune(base):
    invalid(mutate(base, lambda r: r.pop("tune")), r"\n  tune: ")


def test_bad_run_name(base):
    invalid(mutate(base, lambda r: add_run(r, "Bad Name", strategy="top")), r"tune\.runs: .*run name 'Bad Name'")


def add_importance_run(raw: dict, name: str = "x", **run) -> None:
    raw["tune"].setdefault("importance_runs", {})[name] = run


def test_importance_run_without_importance_from(base):
    invalid(
        mutate(base, lambda r: add_importance_run(r, strategy="importance", importance_metric="bi")),
        r"tune\.importance_runs\.x: .*needs importance_metric and importance_from",
    )


def test_importance_run_without_metric(base):
    invalid(
        mutate(base, lambda r: add_importance_run(r, strategy="importance", importance_from="all")),
        r"tune\.importance_runs\.x: .*needs importance_metric and importance_from",
    )


def test_importance_from_unknown_run(base):
    invalid(
        mutate(base, lambda r: add_importance_run(r, strategy="importance", importance_metric="bi", importance_from="nope")),
        r"tune\.importance_runs\.x\.importance_from: no entry of tune\.runs named 'nope'",
    )


def test_importance_run_ok(base):
    params = config.validate(
        mutate(base, lambda r: add_importance_run(r, strategy="importance", budget=3, importance_metric="mm_bi", importance_from="all")),
        "x.yaml",
    )
    assert params.tune.importance_runs["x"].importance_from == "all"
    assert params.tune.run("x").importance_metric == "mm_bi" and "x" in params.tune.all_runs()


def test_importance_run_in_the_wrong_group(base):
    invalid(
        mutate(base, lambda r: add_run(r, strategy="importance", importance_metric="bi", importance_from="all")),
        r"tune\.runs: .*x: importance-selected runs belong in tune\.importance_runs",
    )
    invalid(
        mutate(base, lambda r: add_importance_run(r, strategy="uniform")),
        r"tune\.importance_runs: .*x: tune\.importance_runs entries need strategy 'importance'",
    )


def test_run_name_in_both_groups(base):
    def both(r):
        add_run(r, "x", strategy="top")
        add_importance_run(r, "x", strategy="importance", importance_metric="bi", importance_from="all")

    invalid(mutate(base, both), r"run names \['x'\] appear in both")


def test_unknown_importance_metric(base):
    invalid(
        mutate(base, lambda r: add_importance_run(r, strategy="importance", importance_metric="zzz", importance_from="all")),
        r"tune\.importance_runs\.x\.importance_metric",
    )


def test_pruning_curve_runs_must_exist(base):
    invalid(mutate(base, lambda r: r["prune"].update(curve={"runs": ["nope"]})), r"prune\.curve\.runs: \['nope'\] are not tune runs")
    invalid(mutate(base, lambda r: r["prune"].update(curve={"max_layers": 0})), r"prune\.curve\.max_layers")


def test_vision_pretraining_needs_enough_pairs(base):
    assert config.validate(base).vision_pretrain.train.max_steps > 0 and config.validate(base).data.vision_pairs > 0
    invalid(mutate(base, lambda r: r["data"].update(vision_pairs=0)),
            r"vision_pretrain.train.max_steps > 0 needs data.vision_pairs > vision_pretrain.eval_pairs \(256\), got 0")
    off = mutate(base, lambda r: (r["data"].update(vision_pairs=0), r["vision_pretrain"]["train"].update(max_steps=0)))
    assert config.validate(off).vision_pretrain.train.max_steps == 0  # the tower stays random


# ---------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize(
    "model",
    [
        {"profile": "hf"},
        {"profile": "hf", "vision": "openai/clip-vit-large-patch14-336"},
        {"profile": "hf", "language_model": "lmsys/vicuna-7b-v1.5"},
        {"profile": "hf", "vision": "v", "language_model": "l", "checkpoint": "c"},
    ],
)
def test_hf_profile_needs_sources(base, model):
    invalid(mutate(base, lambda r: r.update(model=model)), r"model: .*profile 'hf' needs either `checkpoint` or both")


@pytest.mark.parametrize("model", [{"profile": "hf", "checkpoint": "llava-hf/llava-1.5-7b-hf"},
                                   {"profile": "hf", "vision": "v", "language_model": "l"}])
def test_hf_profile_ok(base, model):
    assert config.validate(mutate(base, lambda r: r.update(model=model)), "x.yaml").model.profile == "hf"


@pytest.mark.parametrize("profile", ["tiny", "micro"])
@pytest.mark.parametrize("key", ["checkpoint", "vision", "language_model"])
def test_offline_profile_with_sources(base, profile, key):
    invalid(
        mutate(base, lambda r: r["model"].update(profile=profile, **{key: "somewhere"})),
        rf"model: .*profile '{profile}' is built offline",
    )


def test_bad_spec_shape(base):
    invalid(mutate(base, lambda r: r["model"].update(spec={"image_size": 30})), r"model: .*image_size 30 is not a multiple")


def test_spec_override_applies(base):
    params = config.validate(mutate(base, lambda r: r["model"].update(profile="micro", spec={"lm_layers": 6})), "x.yaml")
    assert params.model.profile_spec().lm_layers == 6


def test_bad_spec_field_names_it(base):
    invalid(mutate(base, lambda r: r["model"].update(spec={"vision_layers": 1})),
            r"model: .*spec\.vision_layers: Input should be greater than or equal to 2")


def test_lora_spec_checked(base):
    invalid(mutate(base, lambda r: r["tune"].update(lora={"r": 0})), r"tune\.lora\.r: Input should be greater than or equal to 1")
    invalid(mutate(base, lambda r: r["tune"].update(lora={"dropout": 1.0})), r"tune\.lora\.dropout: Input should be less than 1")


@pytest.mark.parametrize(
    "key, value",
    [("image_size", 8), ("num_captions", -1), ("digits_test_fraction", 1.0), ("text_test_fraction", 0.0),
     ("text_chunk_chars", 10), ("llava_on_error", "ignore"), ("llava_image_mode", "resize"), ("num_proc", 0)],
)
def test_bad_data_value_names_the_key(base, key, value):
    invalid(mutate(base, lambda r: r["data"].update({key: value})), rf"\n  data\.{key}: ")


def test_image_dir_needs_its_json(base):
    invalid(mutate(base, lambda r: r["data"].update(llava_image_dir="images")), r"data: .*llava_image_dir is set but llava_json is not")


def test_value_objects_are_frozen_and_hashable():
    spec = config.PROFILES["micro"]
    with pytest.raises(ValueError, match="frozen"):
        spec.lm_layers = 3
    assert hash(config.LoraSpec()) == hash(config.LoraSpec()) and hash(config.DataConfig()) == hash(config.DataConfig())
    assert spec.model_copy(update={"lm_layers": 3}).lm_layers == 3 and spec.lm_layers == 2


def test_loading_params_imports_no_heavy_library():
    """Loading params must stay cheap: config imports no torch, transformers, datasets, mlflow or prefect."""
    paths = [str(p) for p in SHIPPED]
    code = (
        "import sys\n"
        "import pipeline.config\n"
        f"for path in {paths!r}:\n"
        "    pipeline.config.load(path)\n"
        "heavy = ('torch', 'transformers', 'datasets', 'mlflow', 'prefect')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"imported by pipeline.config: {proc.stdout.strip()}"


# ---------------------------------------------------------------------------------------------------- registry
def with_benchmark_gate(floors: dict, tasks: tuple[str, ...] | None = ("mmlu", "pope")):
    def fn(r):
        r["registry"]["min_benchmark_retention"] = floors
        if tasks is not None:
            r.setdefault("evaluate", {})["benchmarks"] = {"tasks": list(tasks)}
    return fn


def test_the_benchmark_gate_is_off_by_default_and_takes_score_names(base):
    assert config.validate(base).registry.min_benchmark_retention == {}
    floors = {"visual_average": 0.95, "mmlu": 1.0, "pope_random.f1": 0.9}
    assert config.validate(mutate(base, with_benchmark_gate(floors))).registry.min_benchmark_retention == floors


def test_a_benchmark_gate_without_benchmarks_is_rejected_naming_it(base):
    invalid(mutate(base, with_benchmark_gate({"mmlu": 1.0}, tasks=None)),
            r"registry\.min_benchmark_retention: gates on \['mmlu'\], but evaluate\.benchmarks\.tasks is empty")


@pytest.mark.parametrize(
    "floors, match",
    [
        ({"mmlu": -0.1}, r"registry\.min_benchmark_retention: .*mmlu: the floor must be a number >= 0, got -0\.1"),
        ({"mmlu": float("nan")}, r"registry\.min_benchmark_retention: .*mmlu: the floor must be a number >= 0, got nan"),
        ({"mmlu": "high"}, r"registry\.min_benchmark_retention\.mmlu: .*valid number"),
        ({"mmlu.": 1.0}, r"registry\.min_benchmark_retention: .*'mmlu\.' is not a benchmark score name"),
        ({" mmlu": 1.0}, r"registry\.min_benchmark_retention: .*' mmlu' is not a benchmark score name"),
        ({"": 1.0}, r"registry\.min_benchmark_retention: .*'' is not a benchmark score name"),
        (["mmlu"], r"registry\.min_benchmark_retention: .*valid dictionary"),
    ],
)
def test_bad_benchmark_gate_entries_name_the_key(base, floors, match):
    invalid(mutate(base, with_benchmark_gate(floors)), match)


# ---------------------------------------------------------------------------------------------------- files
def test_not_a_mapping():
    for raw in (None, [1, 2], "tune"):
        with pytest.raises(config.ParamsError, match="expected a mapping at the top level"):
            config.validate(raw, "x.yaml")


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tune: {runs: [\n  - : :\n")
    with pytest.raises(config.ParamsError, match=rf"params file {re.escape(str(path))} is not valid YAML"):
        config.load(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(config.ParamsError, match=rf"params file {re.escape(str(path))} does not exist"):
        config.load(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(config.ParamsError, match=r"expected a mapping"):
        config.load(path)


def test_load_error_names_file_and_key(tmp_path, base):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(mutate(base, lambda r: r["tune"]["train"].update(max_steps="abc"))))
    with pytest.raises(config.ParamsError, match=rf"invalid params in {re.escape(str(path))}:\n  tune\.train\.max_steps"):
        config.load(path)


def test_params_error_is_value_error():
    assert issubclass(config.ParamsError, ValueError)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_params_define_every_key_dvc_tracks(path):
    """`dvc repro` refuses a stage whose tracked params key is missing from params.yaml."""
    raw = yaml.safe_load(path.read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        keys = [k for k in body.get("params", []) if isinstance(k, str)]
        runs = [None]
        if "foreach" in stage:  # "${tune.runs}" -> the run names of that group
            group = raw
            for part in stage["foreach"].strip("${}").split("."):
                group = group.get(part) or {}
            runs = list(group)
        for run in runs:
            for key in keys:
                node = raw
                for part in key.replace("${key}", str(run)).split("."):
                    assert isinstance(node, dict) and part in node, f"{path.name}: stage {name} tracks missing key {key}"
                    node = node[part]


def test_lora_study_params_are_the_study_with_lora_on_both_sides():
    study, lora = (yaml.safe_load((ROOT / "params" / p).read_text()) for p in ("study.yaml", "study-lora.yaml"))
    assert {name: run["language_model"] for name, run in lora["tune"]["runs"].items()} == {"all": "lora", "uniform25": "lora"}
    for raw in (study, lora):
        raw["tune"].pop("runs"), raw["tune"].pop("importance_runs"), raw["prune"].pop("curve")
    assert lora == study  # regenerate params/study-lora.yaml when params/study.yaml changes


def test_study_params_are_the_default_plus_the_study_runs():
    default, study = (yaml.safe_load((ROOT / p).read_text()) for p in ("params.yaml", "params/study.yaml"))
    for raw in (default, study):
        raw["tune"].pop("runs"), raw["tune"].pop("importance_runs"), raw["prune"].pop("curve")
        raw["evaluate"].pop("vqa_samples"), raw["evaluate"].pop("digits_samples")  # the study evaluates on fewer
    assert study == default  # regenerate params/study.yaml when params.yaml changes

    params = config.load(ROOT / "params" / "study.yaml")
    runs = params.tune.runs.values()
    assert {r.strategy for r in runs} >= {"all", "uniform", "bottom", "lower_middle", "upper_middle", "top", "bottom_top", "random"}
    assert len({r.seed for r in runs if r.strategy == "random"}) >= 3
    assert {r.importance_metric for r in params.tune.importance_runs.values()} == {
        "param_change", "param_angular", "bi", "mm_bi", "image_attention"}
    num_layers = params.model.profile_spec().lm_layers
    sweep = {len(select_layers(num_layers, r.strategy, r.budget)) for r in runs if r.strategy in ("uniform", "all")}
    assert {1, num_layers} <= sweep and len(sweep) >= 6


def test_depth_study_params_are_the_study_on_the_depth_test_bed():
    """params/study-depth.yaml: params/study.yaml with the test bed's LM (docs/results.md) and only the compared runs,
    each over 3 training seeds."""
    study, depth = (yaml.safe_load((ROOT / "params" / p).read_text()) for p in ("study.yaml", "study-depth.yaml"))
    assert depth["model"].pop("spec") == {"lm_layers": 6, "lm_init_std": 0.1}
    assert depth["lm_pretrain"].pop("min_bi_median_to_max") == 0.12
    for raw in (study, depth):
        raw["tune"].pop("runs"), raw["tune"].pop("importance_runs", None), raw["prune"].pop("curve")
        raw["lm_pretrain"].pop("lr"), raw["lm_pretrain"]["train"].pop("max_steps")
    assert depth == study  # regenerate params/study-depth.yaml when params/study.yaml changes
    params = config.load(ROOT / "params" / "study-depth.yaml")
    replicas = params.tune.replicas(params.seed)
    assert {name: len(runs) for name, runs in replicas.items()} == {"all": 3, "uniform25": 3, "top25": 3}
    assert set(params.prune.curve.runs) == set(replicas["all"]) | set(replicas["uniform25"])
