"""The MLflow registry: the promotion gate both ways, registration of a checkpoint directory on an MLflow server whose
artifacts live in S3, champion by alias loaded in a fresh process answering a question about an image, and a
tracking server that is down."""

import io
import json
import math
import subprocess
import time

import pytest

from servers import BUCKET, PY, REPO, S3_KEY, S3_SECRET, base_env, sh


# ---------------------------------------------------------------------------------------------------- the gate
def test_gate_passes_when_both_retentions_reach_their_thresholds():
    from pipeline.registry import gate

    d = gate(0.95, 1.3, min_visual=0.9, min_text=0.9)
    assert d.passed and d.reasons == () and d.summary() == "passed"
    assert gate(0.9, 0.9, min_visual=0.9, min_text=0.9).passed  # the threshold itself passes


@pytest.mark.parametrize(
    "visual, text, why",
    [
        (0.85, 1.0, "visual retention 0.850 < 0.900"),
        (1.0, 0.5, "text retention 0.500 < 0.900"),
        (float("nan"), 1.0, "visual retention is undefined"),
        (1.0, None, "text retention is undefined"),
    ],
)
def test_gate_refuses_naming_the_reason(visual, text, why):
    from pipeline.registry import gate

    d = gate(visual, text, min_visual=0.9, min_text=0.9)
    assert not d.passed and any(why in r for r in d.reasons), d.reasons
    assert d.summary().startswith("refused: ")
    assert d.visual_retention is None or not math.isnan(d.visual_retention)  # JSON-safe


# The gate on benchmark scores (registry.min_benchmark_retention), from hand-made eval metrics: the `all` run's tuned
# scores and a model's, in the shape stage evaluate writes ({task: {metric: value}}; an average as one number).
ALL_BENCH = {"visual_average": 0.5, "mmlu": {"acc": 0.5}, "pope_random": {"accuracy": 0.8, "f1": 0.5}, "mme": {"perception": 0.0}}
MODEL_BENCH = {"visual_average": 0.4375, "mmlu": {"acc": 0.5}, "pope_random": {"accuracy": 0.6, "f1": 0.375},
               "mme": {"perception": 900.0}, "gqa": {"exact_match": None}}


def test_benchmark_retention_resolves_each_gate_key_to_one_score():
    from pipeline.registry import benchmark_retention

    keys = ["visual_average", "mmlu", "pope_random.f1", "mmlu.acc", "mme", "gqa", "textvqa_val"]
    got = benchmark_retention(MODEL_BENCH, ALL_BENCH, keys)
    assert got["visual_average"] == 0.875  # an average: a single number
    assert got["mmlu"] == got["mmlu.acc"] == 1.0  # a task with one score, by its name alone or in full
    assert got["pope_random.f1"] == 0.75
    assert math.isnan(got["mme"])  # the `all` baseline scores 0
    assert "gqa" not in got and "textvqa_val" not in got  # not in the `all` run's metrics / in neither
    assert benchmark_retention(None, ALL_BENCH, ["mmlu"]) == {}  # a model without benchmark scores
    assert benchmark_retention({"gqa": {"exact_match": None}}, {"gqa": {"exact_match": 0.5}}, ["gqa"]) == {"gqa": None}


def test_a_gate_key_naming_a_task_with_several_scores_is_refused_naming_it():
    from pipeline.registry import RegistryError, benchmark_retention

    with pytest.raises(RegistryError, match=r"^registry\.min_benchmark_retention\.pope_random: names 2 scores "
                                            r"\(pope_random\.accuracy, pope_random\.f1\); name one of them$"):
        benchmark_retention(MODEL_BENCH, ALL_BENCH, ["pope_random"])


def test_the_gate_passes_when_every_named_benchmark_keeps_its_share():
    from pipeline.registry import benchmark_retention, gate

    floors = {"visual_average": 0.875, "mmlu": 1.0, "pope_random.f1": 0.75}  # each exactly reached: passes
    d = gate(1.0, 1.0, min_visual=0.9, min_text=0.9, min_benchmarks=floors,
             benchmarks=benchmark_retention(MODEL_BENCH, ALL_BENCH, floors))
    assert d.passed and d.summary() == "passed", d.reasons
    assert set(d.benchmark_retention) == set(floors) and d.benchmark_retention["mmlu"] == 1.0
    assert gate(1.0, 1.0, min_visual=0.9, min_text=0.9).benchmark_retention == {}  # no benchmark gate: as before


@pytest.mark.parametrize(
    "floors, why",
    [
        ({"visual_average": 0.9}, "benchmark visual_average retention 0.875 < 0.900"),
        ({"pope_random.accuracy": 0.9}, "benchmark pope_random.accuracy retention 0.750 < 0.900"),
        ({"mme": 0.5}, "benchmark mme retention is undefined (the `all` baseline scores 0"),
        ({"gqa": 0.5}, "benchmark gqa: no score in this model's or the `all` run's eval metrics"),
        ({"textvqa_val": 0.5}, "benchmark textvqa_val: no score in this model's or the `all` run's eval metrics"),
    ],
)
def test_the_gate_refuses_a_named_benchmark_naming_the_reason(floors, why):
    from pipeline.registry import benchmark_retention, gate

    d = gate(1.0, 1.0, min_visual=0.9, min_text=0.9, min_benchmarks=floors,
             benchmarks=benchmark_retention(MODEL_BENCH, ALL_BENCH, floors))
    assert not d.passed and d.reasons == (next(r for r in d.reasons if why in r),), d.reasons
    assert all(v is None or not math.isnan(v) for v in d.benchmark_retention.values())  # JSON-safe
    both = gate(0.5, 1.0, min_visual=0.9, min_text=0.9, min_benchmarks=floors,
                benchmarks=benchmark_retention(MODEL_BENCH, ALL_BENCH, floors))
    assert len(both.reasons) == 2 and both.reasons[0].startswith("visual retention 0.500")  # every reason is said


def test_a_gate_key_no_run_has_is_a_one_line_error_naming_it():
    from pipeline.registry import RegistryError, check_benchmark_keys

    metrics = [ALL_BENCH, MODEL_BENCH, None]
    check_benchmark_keys(["visual_average", "mmlu", "pope_random.f1", "gqa"], metrics)  # gqa: one model has it
    with pytest.raises(RegistryError, match=r"^registry\.min_benchmark_retention\.mmlu_pro: no run's eval metrics "
                                            r"have this benchmark score \(they have: visual_average, mmlu\.acc, ") as err:
        check_benchmark_keys(["mmlu", "mmlu_pro"], metrics)
    assert "\n" not in str(err.value)
    with pytest.raises(RegistryError, match=r"min_benchmark_retention\.pope_random: names 2 scores"):
        check_benchmark_keys(["pope_random"], metrics)
    with pytest.raises(RegistryError, match=r"\(they have: none\)"):
        check_benchmark_keys(["mmlu"], [None, {}])


def test_model_names_one_registered_model_per_run_and_kind():
    from pipeline.registry import model_name

    assert model_name("vr", "uniform25", "pruned") == "vr-uniform25"
    assert model_name("vr", "uniform25", "tuned") == "vr-uniform25-tuned"


# ---------------------------------------------------------------------------------------------------- registry
@pytest.fixture
def tracking(mlflow_server, s3_server):
    """This process talks to the test's MLflow server; the previous tracking URI comes back afterwards."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.url)
    yield mlflow
    mlflow.set_tracking_uri(previous)


def png(color: str = "red") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_register_promote_and_load_champion_in_a_fresh_process(tracking, micro4_dir, s3_server, mlflow_server, tmp_path):
    from flows.services import s3_client
    from pipeline import registry

    mlflow = tracking
    name = f"vr-test-{int(time.time() * 1000)}"
    mlflow.set_experiment("vr-registry-test")

    v1 = registry.register_checkpoint(micro4_dir, name, tags={"vr_run": "uniform50", "vr_kind": "pruned"})
    assert registry.alias_version(name, registry.CHALLENGER) == v1 and registry.alias_version(name, registry.CHAMPION) is None
    assert registry.promote(name, v1, registry.gate(0.97, 1.1, min_visual=0.9, min_text=0.9))
    assert registry.alias_version(name, registry.CHAMPION) == v1

    # A worse checkpoint: challenger moves to it, the gate refuses, champion stays where it was.
    v2 = registry.register_checkpoint(micro4_dir, name)
    assert not registry.promote(name, v2, registry.gate(0.5, 1.1, min_visual=0.9, min_text=0.9))
    assert (registry.alias_version(name, registry.CHALLENGER), registry.alias_version(name, registry.CHAMPION)) == (v2, v1)
    client = mlflow.MlflowClient()
    assert client.get_model_version(name, v2).tags["gate"].startswith("refused: visual retention 0.500")
    # Refused on a benchmark the gate names but the metrics lack: said on the version, champion still where it was.
    assert not registry.promote(name, v2, registry.gate(0.97, 1.1, min_visual=0.9, min_text=0.9,
                                                        benchmarks={}, min_benchmarks={"mmlu": 1.0}))
    assert client.get_model_version(name, v2).tags["gate"] == (
        "refused: benchmark mmlu: no score in this model's or the `all` run's eval metrics")
    assert registry.alias_version(name, registry.CHAMPION) == v1
    assert client.get_model_version(name, v1).tags["vr_run"] == "uniform50"

    # The checkpoint went to S3 through the server's artifact proxy: its weights are objects in the bucket.
    keys = [o["Key"] for page in s3_client(s3_server.url, S3_KEY, S3_SECRET).get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix="mlflow/") for o in page.get("Contents", [])]
    assert any(k.endswith("artifacts/checkpoint/model.safetensors") or k.endswith(".safetensors") for k in keys), keys[:20]

    # models:/<name>@champion in a fresh process, run from an empty directory: the model's code travels with it.
    (tmp_path / "image.png").write_bytes(png())
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('models:/{name}@champion')\n"
        "image = open('image.png', 'rb').read()\n"
        "out = m.predict(pd.DataFrame({'image': [image, image], 'question': ['What colour is the shape?', "
        "'How many shapes are there?']}), params={'max_new_tokens': 3})\n"
        "print('ANSWERS=' + json.dumps(out))\n"
    )
    env = base_env(tmp_path, MLFLOW_TRACKING_URI=mlflow_server.url)
    proc = sh([PY, "-c", code], tmp_path, env, timeout=300)
    answers = json.loads(proc.stdout.split("ANSWERS=")[-1])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_an_unchanged_checkpoint_is_not_registered_again(tracking, micro4_dir):
    from pipeline import registry

    name = f"vr-fp-{int(time.time() * 1000)}"
    tracking.set_experiment("vr-registry-test")
    v1 = registry.register_checkpoint(micro4_dir, name, fingerprint="aaaa")
    assert registry.register_checkpoint(micro4_dir, name, fingerprint="aaaa") == v1  # the stage re-ran, the weights did not change
    v2 = registry.register_checkpoint(micro4_dir, name, fingerprint="bbbb")
    assert v2 != v1 and registry.alias_version(name, registry.CHALLENGER) == v2


def test_load_without_champion_is_a_clear_error(tracking):
    from pipeline import registry

    with pytest.raises(registry.RegistryError, match="no version with alias 'champion'"):
        registry.load("vr-no-such-model")


def test_register_refuses_a_directory_without_weights(tracking, tmp_path):
    from pipeline import registry

    with pytest.raises(registry.RegistryError, match=r"has no \*\.safetensors weights"):
        registry.register_checkpoint(tmp_path, "vr-empty")


# ---------------------------------------------------------------------------------------------------- faults
def test_tracking_server_down_is_a_clear_bounded_error(tmp_path):
    """The register stage with MLFLOW_TRACKING_URI on a closed port: one line naming the server, exit 2, in
    seconds (bounded retries), not MLflow's minutes of client retries."""
    from flows.services import free_port

    url = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "metrics").mkdir()
    env = base_env(tmp_path, MLFLOW_TRACKING_URI=url, PYTHONPATH=str(REPO), VR_PARAMS=str(REPO / "params" / "micro.yaml"))
    t0 = time.monotonic()
    proc = subprocess.run([PY, "-m", "stages.register"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"MLflow tracking server {url} is unreachable after 3 attempts" in proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - t0 < 60
    assert not (tmp_path / "metrics" / "registry.json").exists()
