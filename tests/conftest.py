import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TESTS = Path(__file__).resolve().parent
LAYERS = ("unit", "stages", "flows")
SERVER_FIXTURES = {"s3_server", "mlflow_server", "prefect_server"}


def pytest_collection_modifyitems(items):
    """Mark each test with its layer (the folder it lives in) and, when it uses a real server, `servers`: so
    `-m unit`, `-m "not servers"` or `-m "not slow and not servers"` select by what a test needs, not by file."""
    for item in items:
        parts = Path(item.fspath).resolve().relative_to(TESTS).parts
        if parts[0] in LAYERS:
            item.add_marker(parts[0])
        if SERVER_FIXTURES & set(item.fixturenames):
            item.add_marker("servers")

MICRO_TEXTS = [
    "USER: <image>\nWhat colour is the circle? ASSISTANT: red",
    "What shape is the blue object? square triangle circle. How many shapes are there? one two three four",
    "Is the red circle on the left or the right? left right top bottom yes no",
    "The quick brown fox jumps over the lazy dog. def class return import for while if else",
] * 4


def build_micro(root: Path, **spec_overrides) -> Path:
    """Build and save a micro LLaVA (the micro profile with `spec_overrides`) under `root`; returns its directory."""
    import pipeline.model

    spec = pipeline.model.ProfileSpec(**(pipeline.model.PROFILES["micro"].model_dump() | spec_overrides))  # validated, unlike model_copy
    vision_dir, lm_dir = pipeline.model.build_offline_parts(spec, MICRO_TEXTS, root, seed=0)
    model, processor = pipeline.model.compose_llava(str(vision_dir), str(lm_dir))
    pipeline.model.save_vlm(model, processor, root / "base")
    return root / "base"


@pytest.fixture(scope="session")
def micro_dir(tmp_path_factory) -> Path:
    """A saved micro LLaVA checkpoint (2 layers, hidden 32) with its processor."""
    return build_micro(tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="session")
def micro4_dir(tmp_path_factory) -> Path:
    """The micro LLaVA with 4 decoder layers: room for a region, a pruned layer and a kept one."""
    return build_micro(tmp_path_factory.mktemp("micro4"), lm_layers=4)


@pytest.fixture
def micro(micro_dir):
    """A fresh (model, processor) pair loaded from the micro checkpoint."""
    import pipeline.model

    return pipeline.model.load_vlm(micro_dir)


# ------------------------------------------------------------------------------------------ real servers on 127.0.0.1
# Started on first use, once per session, on free ports with their data in tmp dirs; stopped (whole process group)
# at the end. See flows/services.py and tests/helpers/servers.py.
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS with bucket `visual-region`; its only identity is (servers.S3_KEY, servers.S3_SECRET)."""
    from flows import services
    from servers import BUCKET, S3_KEY, S3_SECRET

    with services.seaweedfs(tmp_path_factory.mktemp("s3"), port=services.free_port(), buckets=(BUCKET,),
                            access_key=S3_KEY, secret_key=S3_SECRET) as svc:
        yield svc


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """An MLflow server (sqlite backend + registry) whose artifacts go to s3://visual-region/mlflow."""
    from flows import services
    from servers import BUCKET, s3_env

    with services.mlflow_server(tmp_path_factory.mktemp("mlflow"), port=services.free_port(),
                                artifacts_destination=f"s3://{BUCKET}/mlflow", s3_endpoint=s3_server.url,
                                env=s3_env(s3_server.url)) as svc:
        yield svc


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A Prefect API (no UI, no scheduler: deployments' cron schedules create no runs during the tests)."""
    from flows import services

    with services.prefect_server(tmp_path_factory.mktemp("prefect"), port=services.free_port(), ui=False,
                                 scheduler=False) as svc:
        yield svc
