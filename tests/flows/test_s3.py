"""The DVC remote on a real S3 server (SeaweedFS on 127.0.0.1): push, then a fresh clone + `dvc pull` restores every
output byte for byte; an unreachable endpoint, a missing bucket and wrong credentials are clear errors naming the
endpoint, and leave the local cache and outputs intact and the pipeline runnable by plain `dvc repro`."""

import uuid

import pytest

from servers import BUCKET, S3_KEY, S3_SECRET, base_env, lock_outputs, dvc, make_toy_workspace, s3_env, sh, tree_bytes


@pytest.fixture(scope="module")
def toy(tmp_path_factory, s3_server):
    """A reproduced, committed and pushed toy workspace; its remote is a fresh prefix of the bucket."""
    tmp = tmp_path_factory.mktemp("s3toy")
    env = base_env(tmp, **s3_env(s3_server.url))
    remote = f"s3://{BUCKET}/dvc-{uuid.uuid4().hex[:8]}"
    ws = make_toy_workspace(tmp / "ws", env, remote)
    dvc(ws, env, "repro")
    sh(["git", "add", "-A"], ws, env)
    sh(["git", "commit", "-qm", "repro"], ws, env)
    pushed = dvc(ws, env, "push")
    return ws, env, remote, pushed


def objects(s3_server, prefix: str) -> list[str]:
    from flows.services import s3_client

    pages = s3_client(s3_server.url, S3_KEY, S3_SECRET).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_push_stores_every_cached_output_in_the_bucket(toy, s3_server):
    ws, _, remote, pushed = toy
    assert "pushed" in pushed.stdout
    prefix = remote.removeprefix(f"s3://{BUCKET}/")
    keys = objects(s3_server, prefix)
    # DVC 3 layout: files/md5/<2>/<rest>; a directory is its .dir manifest plus one object per file
    assert len(keys) == 1 + 1 + 3, keys
    manifest = lock_outputs(ws)["out"].removesuffix(".dir")
    assert f"{prefix}/files/md5/{manifest[:2]}/{manifest[2:]}.dir" in keys, keys


def test_fresh_clone_and_pull_restore_every_output_byte_for_byte(toy, tmp_path):
    ws, env, _, _ = toy
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(ws), str(clone)], tmp_path, env)
    assert not (clone / "out").exists()
    # the documented way for a non-AWS store: the endpoint in the clone's local (git-ignored) DVC config
    endpoint = env["AWS_ENDPOINT_URL_S3"]
    no_endpoint_env = {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL_S3"}
    dvc(clone, no_endpoint_env, "remote", "modify", "--local", "s3", "endpointurl", endpoint)
    dvc(clone, no_endpoint_env, "pull")
    for path in ("out", "metrics/toy.json"):
        assert tree_bytes(clone / path) == tree_bytes(ws / path), path
    assert "up to date" in dvc(clone, no_endpoint_env, "status").stdout


@pytest.mark.parametrize("fault", ["unreachable", "missing bucket", "wrong credentials"])
def test_s3_faults_are_clear_and_leave_local_state_intact(toy, tmp_path, fault, monkeypatch):
    from flows.workspace import PipelineError, TransientError, check_s3_remote
    from flows.services import free_port

    ws, env, remote, _ = toy
    bad_env, bad_remote = dict(env), remote
    endpoint = env["AWS_ENDPOINT_URL_S3"]
    if fault == "unreachable":
        endpoint = bad_env["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{free_port()}"
    elif fault == "missing bucket":
        bad_remote = "s3://vr-no-such-bucket/dvc"
    else:
        bad_env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, bad_env[key])

    # the pipeline's preflight: one message naming the endpoint; only an unreachable endpoint is worth a retry
    with pytest.raises(PipelineError) as err:
        check_s3_remote("s3", {"url": bad_remote})
    message = str(err.value)
    assert endpoint in message and bad_remote in message
    assert isinstance(err.value, TransientError) == (fault == "unreachable")
    assert {"unreachable": "is unreachable", "missing bucket": "bucket 'vr-no-such-bucket' does not exist",
            "wrong credentials": "refused the credentials"}[fault] in message
    assert S3_SECRET not in message and "not-the-secret" not in message

    # DVC itself fails the push (new data, so it has something to send) and keeps everything local
    before = {p: tree_bytes(ws / p) for p in ("out", "metrics/toy.json")}
    remote_args = ["-r", "bad"] if fault == "missing bucket" else []
    if fault == "missing bucket":
        dvc(ws, bad_env, "remote", "add", "--local", "-f", "bad", bad_remote)
    (ws / "extra.txt").write_text(f"extra {fault}\n")
    dvc(ws, bad_env, "add", "extra.txt")
    push = dvc(ws, bad_env, "push", *remote_args, check=False, timeout=300)
    assert push.returncode != 0
    assert {p: tree_bytes(ws / p) for p in before} == before
    status = dvc(ws, bad_env, "status").stdout
    assert "changed" not in status and "deleted" not in status
    # plain `dvc repro` (no Prefect, no S3) still works: forced, it rebuilds the same bytes
    dvc(ws, {k: v for k, v in bad_env.items() if not k.startswith("PREFECT_")}, "repro", "-f")
    assert {p: tree_bytes(ws / p) for p in before} == before
    (ws / "extra.txt").unlink()
    (ws / "extra.txt.dvc").unlink()
    if fault == "missing bucket":
        dvc(ws, env, "remote", "remove", "--local", "bad")
