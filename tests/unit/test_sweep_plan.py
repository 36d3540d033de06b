"""The sweep's pure parts (flows/sweep/): the plan from dvc.yaml's stages and the params, which child states are
retried, and the exchange tarballs' path checks. No servers; the one test on this repo's real dvc.yaml runs DVC's
parser in a temporary `dvc init --no-scm` directory."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from flows.sweep.exchange import is_allowed, key, pack, unpack
from flows.sweep.fanout import classify
from flows.sweep.plan import PlanError, Stage, dependency_order, overlaps, plan_sweep
from flows.workspace import PipelineError
from pipeline import config

REPO = Path(__file__).resolve().parents[2]
TUNE_DEPS = ("stages/tune.py", "pipeline/data", "pipeline/model.py", "models/projector", "data/prepared")


def project_stages(runs: list[str], importance: dict[str, str]) -> list[Stage]:
    """The shape of this project's dvc.yaml (fewer deps): the shared stages, per run tune/prune/evaluate (for an
    importance run, tune also reads the scores of the run it is selected from), then the study's own stages."""
    stages = [
        Stage("prepare", ("stages/prepare.py", "pipeline/data"),
              (("data/prepared", True), ("metrics/data.json", False))),
        Stage("build_base", ("stages/build_base.py", "data/prepared"),
              (("models/base", True), ("metrics/base.json", False))),
        Stage("pretrain_projector", ("stages/pretrain_projector.py", "models/base", "data/prepared"),
              (("models/projector", True), ("metrics/projector.json", False))),
    ]
    groups = [("", run, ()) for run in runs] + [("_importance", run, (f"plots/importance/{source}.json",))
                                               for run, source in importance.items()]
    stages += [Stage(f"tune{group}@{run}", TUNE_DEPS + extra,
                     ((f"models/tuned/{run}", True), (f"metrics/tune/{run}.json", False),
                      (f"plots/loss/{run}.csv", False)))
               for group, run, extra in groups]
    stages += [Stage(f"prune{group}@{run}",
                     ("stages/prune.py", f"models/tuned/{run}", "models/projector", "data/prepared"),
                     ((f"models/pruned/{run}", True), (f"plots/importance/{run}.json", False),
                      (f"metrics/prune/{run}.json", False)))
               for group, run, _ in groups]
    stages += [Stage(f"evaluate{group}@{run}", ("stages/evaluate.py", f"models/tuned/{run}", f"models/pruned/{run}",
                                                f"metrics/tune/{run}.json", "data/prepared"),
                     ((f"metrics/eval/{run}.json", False),))
               for group, run, _ in groups]
    stages += [
        Stage("pruning_curve", ("stages/pruning_curve.py", "models/tuned", "plots/importance", "data/prepared"),
              (("metrics/pruning_curve.json", False),)),
        Stage("report",
              ("stages/report.py", "metrics/eval", "metrics/tune", "metrics/pruning_curve.json", "models/tuned"),
              (("metrics/summary.json", False), ("reports/summary.md", False))),
        Stage("register", ("stages/register.py", "metrics/eval", "models/pruned", "models/tuned"),
              (("metrics/registry.json", False),)),
    ]
    return stages


def params_with(runs: dict, importance: dict | None = None) -> config.Params:
    return config.validate({"tune": {"runs": {"all": {"strategy": "all"}, **runs}, "importance_runs": importance or {}},
                            "prune": {"curve": {"runs": ["all"]}}})


UNIFORM = {"strategy": "uniform", "budget": 0.5}


def importance_from(source: str) -> dict:
    return {"strategy": "importance", "budget": 1, "importance_metric": "bi", "importance_from": source}


# ---------------------------------------------------------------------------------------------------- the plan
def test_the_baseline_and_the_shared_stages_are_the_parents_and_each_selection_is_one_child():
    plan = plan_sweep(project_stages(["all", "uniform50"], {"bi1": "all"}),
                      params_with({"uniform50": UNIFORM}, {"bi1": importance_from("all")}))
    assert plan.in_parent == ["all"]
    assert plan.upstream == ["prepare", "build_base", "pretrain_projector", "tune@all", "prune@all", "evaluate@all"]
    assert list(plan.children) == ["uniform50", "bi1"]
    uniform, scored = plan.children["uniform50"], plan.children["bi1"]
    assert uniform.stages == ["tune@uniform50", "prune@uniform50", "evaluate@uniform50"]
    assert scored.stages == ["tune_importance@bi1", "prune_importance@bi1", "evaluate_importance@bi1"]
    # cached inputs come from the remote (not models/base: no child stage reads it), uncached ones from the parent
    assert uniform.pull == scored.pull == ["data/prepared", "models/projector"]
    assert uniform.inputs == [] and scored.inputs == ["plots/importance/all.json"]
    assert uniform.cached == ["models/pruned/uniform50", "models/tuned/uniform50"]
    assert uniform.outputs == ["metrics/eval/uniform50.json", "metrics/prune/uniform50.json",
                               "metrics/tune/uniform50.json", "plots/importance/uniform50.json",
                               "plots/loss/uniform50.csv"]
    assert "stages/tune.py" in plan.sources and "pipeline/data" in plan.sources
    assert not any(path.startswith(("models/", "data/", "metrics/", "plots/")) for path in plan.sources)


def test_a_run_that_an_importance_run_is_scored_on_is_run_by_the_parent():
    plan = plan_sweep(project_stages(["all", "uniform50", "top50"], {"bi1": "uniform50"}),
                      params_with({"uniform50": UNIFORM, "top50": {"strategy": "top", "budget": 0.5}},
                                  {"bi1": importance_from("uniform50")}))
    assert plan.in_parent == ["all", "uniform50"]
    assert set(plan.children) == {"top50", "bi1"}
    assert {"tune@uniform50", "prune@uniform50", "evaluate@uniform50"} <= set(plan.upstream)
    assert plan.children["bi1"].inputs == ["plots/importance/uniform50.json"]


def test_only_the_baseline_means_no_children():
    plan = plan_sweep(project_stages(["all"], {}), params_with({}))
    assert plan.children == {} and plan.in_parent == ["all"]
    assert plan.upstream == ["prepare", "build_base", "pretrain_projector", "tune@all", "prune@all", "evaluate@all"]


def test_the_study_stages_are_left_for_after_the_gathering():
    plan = plan_sweep(project_stages(["all", "uniform50"], {}), params_with({"uniform50": UNIFORM}))
    every = set(plan.upstream) | {stage for sel in plan.children.values() for stage in sel.stages}
    assert not every & {"pruning_curve", "report", "register"}


def test_a_selections_stages_run_in_dependency_order_whatever_dvc_yamls_order():
    stages = project_stages(["all", "uniform50"], {})
    reordered = [s for s in stages if not s.name.endswith("@uniform50")] + \
        [s for s in stages if s.name.startswith("evaluate@uniform50")] + \
        [s for s in stages if s.name.startswith("prune@uniform50")] + \
        [s for s in stages if s.name.startswith("tune@uniform50")]
    plan = plan_sweep(reordered, params_with({"uniform50": UNIFORM}))
    assert plan.children["uniform50"].stages == ["tune@uniform50", "prune@uniform50", "evaluate@uniform50"]


def test_a_run_without_stages_is_an_error_naming_it():
    stages = [s for s in project_stages(["all", "uniform50"], {}) if not s.name.endswith("@uniform50")]
    with pytest.raises(PlanError, match=r"no stages for the runs \['uniform50'\]"):
        plan_sweep(stages, params_with({"uniform50": UNIFORM}))


def test_children_that_read_each_others_outputs_are_an_error():
    stages = project_stages(["all", "a", "b"], {})
    stages = [Stage(s.name, s.deps + ("models/tuned/a",), s.outs) if s.name == "tune@b" else s for s in stages]
    with pytest.raises(PlanError, match=r"tune@b \(run b\) reads the outputs of tune@a \(run a\)"):
        # b another seed of a's selection: two identical entries are refused (config: the same selection twice)
        plan_sweep(stages, params_with({"a": UNIFORM, "b": UNIFORM | {"train_seed": 1}}))


def test_dependency_order_keeps_ties_and_refuses_a_cycle():
    assert dependency_order(["x", "y", "z"], {"x": {"z"}, "y": set(), "z": set()}) == ["y", "z", "x"]
    with pytest.raises(PlanError, match="in a cycle"):
        dependency_order(["x", "y"], {"x": {"y"}, "y": {"x"}})


@pytest.mark.parametrize("a, b, same", [
    ("models/tuned", "models/tuned/a", True), ("models/tuned/a/", "models/tuned/a", True),
    ("models/tuned/a", "models/tuned/ab", False), ("metrics", "metric", False),
])
def test_overlapping_paths(a, b, same):
    assert overlaps(a, b) is same and overlaps(b, a) is same


def test_the_plan_of_this_repos_dvc_yaml(tmp_path):
    """DVC's own reading of dvc.yaml (foreach stages resolved) gives the plan the hand-made stages above give."""
    from flows.sweep.parent import plan_workspace

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (ws / "params.yaml").write_text(
        "tune:\n  runs:\n    all: {strategy: all}\n    uniform50: {strategy: uniform, budget: 0.5}\n"
        "  importance_runs:\n    bi1: {strategy: importance, budget: 1, importance_metric: bi, importance_from: all}\n"
        "prune: {curve: {runs: [all, uniform50]}}\n")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=ws, check=True)
    plan = plan_workspace(ws)
    assert plan.in_parent == ["all"]
    assert plan.upstream == ["prepare", "build_base", "pretrain_projector", "tune@all", "prune@all", "evaluate@all"]
    uniform, scored = plan.children["uniform50"], plan.children["bi1"]
    assert uniform.stages == ["tune@uniform50", "prune@uniform50", "evaluate@uniform50"]
    assert scored.stages == ["tune_importance@bi1", "prune_importance@bi1", "evaluate_importance@bi1"]
    assert uniform.pull == scored.pull == ["data/prepared", "models/projector"]
    assert uniform.inputs == [] and scored.inputs == ["plots/importance/all.json"]
    assert "metrics/eval/bi1.json" in scored.outputs and "plots/loss/bi1.csv" in scored.outputs
    assert "stages/tune.py" in plan.sources and "params.yaml" not in plan.sources


def test_bad_params_fail_the_plan_before_any_work(tmp_path):
    from flows.sweep.parent import plan_workspace

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (ws / "params.yaml").write_text(
        "tune:\n  runs:\n    all: {strategy: all}\n    x: {strategy: uniform, budget: 1.5}\n")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=ws, check=True)
    with pytest.raises(config.ParamsError, match="tune.runs.x.budget"):
        plan_workspace(ws)


# ---------------------------------------------------------------------------------------------------- retries
def test_only_crashes_and_transient_failures_are_retried():
    assert classify("COMPLETED", "") == "completed"
    assert classify("CRASHED", "Flow run infrastructure exited with non-zero status code -9.") == "retry"
    assert classify("FAILED", "Flow run encountered an exception: TransientError: S3 endpoint x is down") == "retry"
    assert classify("FAILED", "TransientError: MLflow tracking server x is unreachable") == "retry"
    assert classify("FAILED", "Flow run encountered an exception: PipelineError: `dvc repro` failed") == "failed"
    assert classify("FAILED", "PipelineError: tune failed (a TransientError: in its log)") == "failed"
    assert classify("CANCELLED", "") == "failed"


# ---------------------------------------------------------------------------------------------------- the exchange
def tree(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_files_travel_byte_for_byte_and_land_only_where_allowed(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "metrics" / "eval").mkdir(parents=True)
    (src / "metrics" / "eval" / "x.json").write_text('{"a": 1}\n')
    (src / "plots" / "loss").mkdir(parents=True)
    (src / "plots" / "loss" / "x.csv").write_text("step,loss\n1,2.5\n")
    (src / "bin.dat").write_bytes(b"\xff\x00\xfe")
    tarball = tmp_path / "x.tar.gz"
    sent = pack(src, ["metrics/eval/x.json", "plots/loss", "bin.dat"], tarball)
    assert sent == ["metrics/eval/x.json", "plots/loss/x.csv", "bin.dat"]
    assert unpack(tarball, dst, ["metrics/eval/x.json", "plots/loss", "bin.dat"], "child x") == sent
    assert tree(dst) == tree(src)
    with pytest.raises(PipelineError, match="is not one of its files"):
        unpack(tarball, tmp_path / "other", ["metrics/eval/x.json"], "child x")
    assert not (tmp_path / "other").exists()  # nothing written when one file is out of bounds
    with pytest.raises(PipelineError, match="is missing: a stage should have written it"):
        pack(src, ["metrics/eval/y.json"], tmp_path / "y.tar.gz")


def test_a_tarball_cannot_write_outside_its_paths(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    (tmp_path / "payload").write_text("x")
    for name in ("../escape.json", "/etc/passwd", "metrics/eval/../../escape.json"):
        with tarfile.open(evil, "w:gz") as tar:
            tar.add(tmp_path / "payload", arcname=name)
        with pytest.raises(PipelineError, match="is not one of its files"):
            unpack(evil, tmp_path / "ws", ["metrics/eval"], "child x")
    with tarfile.open(evil, "w:gz") as tar:  # a link, even to an allowed place, is refused
        info = tarfile.TarInfo("metrics/eval/link.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(PipelineError, match="is not one of its files"):
        unpack(evil, tmp_path / "ws", ["metrics/eval"], "child x")
    assert not (tmp_path / "ws").exists()


def test_allowed_paths_and_keys():
    assert is_allowed("metrics/eval/x.json", ["metrics/eval/x.json"])
    assert is_allowed("plots/loss/x.csv", ["plots/loss/"])
    assert not is_allowed("metrics/eval/x.jsonx", ["metrics/eval/x.json"])
    assert not is_allowed("metrics", ["metrics/eval/x.json"])  # a parent of an allowed path is not allowed
    assert key("0f3a", "uniform50", "inputs") == "sweeps/0f3a/uniform50/inputs.tar.gz"
    for bad in (("", "x", "inputs"), ("0f3a", "", "inputs"), ("0f3a", "a/b", "inputs")):
        with pytest.raises(PipelineError):
            key(*bad)
