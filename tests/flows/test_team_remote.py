"""The docs' "DVC on S3" steps as a team follows them (issue 21), against the real local S3 server, on the micro
pipeline. Upstream commits a dvc.lock from its own run (as this repo does; no remote holds those outputs). A newcomer
clones it to another path and runs with another thread count: `dvc repro`, commit what it built, an experiment,
`dvc push --all-branches`, `git push`, `dvc exp push`. A teammate's clone of that commit then `dvc pull`s every output its
dvc.lock names, and the experiment's outputs after `dvc exp pull` + `dvc exp apply`."""

import uuid

import yaml

from servers import BUCKET, base_env, dvc, make_project_workspace, s3_env, sh

CACHED = ("data/", "models/")  # the DVC-cached outputs; metrics/, plots/ and reports/ are in git (cache: false)


def cached_outputs(ws) -> dict[str, str]:
    """{path: md5} of the cached stage outputs in dvc.lock."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])
            if o["path"].startswith(CACHED)}


def assert_restored(ws, env) -> None:
    """Every cached output of ws's dvc.lock is there and hashes as dvc.lock says (`dvc status` checks the hashes)."""
    for path in cached_outputs(ws):
        assert (ws / path).exists(), path
    status = dvc(ws, env, "status")
    assert "Data and pipelines are up to date" in status.stdout, status.stdout


def test_newcomer_commits_pushes_and_a_teammate_pulls_every_output(s3_server, tmp_path):
    remote = f"s3://{BUCKET}/dvc-{uuid.uuid4().hex[:8]}"
    credentials = {k: v for k, v in s3_env(s3_server.url).items() if k != "AWS_ENDPOINT_URL_S3"}  # endpoint: per clone

    def env(name: str, threads: int) -> dict[str, str]:
        return base_env(tmp_path, **credentials, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / f'{name}-mlruns.db'}")

    upstream_env = env("upstream", 1)
    upstream = make_project_workspace(tmp_path / "upstream", upstream_env, remote)
    dvc(upstream, upstream_env, "repro")
    sh(["git", "add", "-A"], upstream, upstream_env)
    sh(["git", "commit", "-qm", "upstream's run"], upstream, upstream_env)
    upstream_outputs = cached_outputs(upstream)

    # The newcomer, in the docs' order.
    newcomer_env = env("newcomer", 2)
    newcomer = tmp_path / "elsewhere" / "newcomer"
    sh(["git", "clone", "-q", str(upstream), str(newcomer)], tmp_path, newcomer_env)
    dvc(newcomer, newcomer_env, "repro")
    built = cached_outputs(newcomer)
    assert set(built) == set(upstream_outputs)
    # The prepared data are the same bytes anywhere; trained weights need not be (another thread count or CPU sums
    # in another order: docs/orchestration.md), which is why the newcomer commits the dvc.lock of what it built.
    assert built["data/prepared"] == upstream_outputs["data/prepared"]
    sh(["git", "add", "-A"], newcomer, newcomer_env)
    sh(["git", "commit", "-qm", "newcomer's run"], newcomer, newcomer_env)
    dvc(newcomer, newcomer_env, "exp", "run", "-n", "one-layer", "-S", "tune.runs.uniform50.budget=1")
    experiment = cached_outputs(newcomer)
    assert experiment != built  # the workspace now holds the experiment's models, not the commit's
    dvc(newcomer, newcomer_env, "remote", "modify", "--local", "s3", "endpointurl", s3_server.url)
    dvc(newcomer, newcomer_env, "push", "--all-branches")  # the workspace and every branch's last commit
    sh(["git", "push", "-q", "origin", "HEAD:refs/heads/newcomer-run"], newcomer, newcomer_env)
    dvc(newcomer, newcomer_env, "exp", "push", "origin", "one-layer")  # the experiment's git ref and its outputs

    # A teammate clones the newcomer's pushed commit from the team's repository and pulls.
    teammate_env = env("teammate", 2)
    teammate = tmp_path / "teammate"
    sh(["git", "clone", "-q", "-b", "newcomer-run", str(upstream), str(teammate)], tmp_path, teammate_env)
    dvc(teammate, teammate_env, "remote", "modify", "--local", "s3", "endpointurl", s3_server.url)
    dvc(teammate, teammate_env, "pull")
    assert cached_outputs(teammate) == built
    assert_restored(teammate, teammate_env)

    # ... and the experiment, once they take it.
    dvc(teammate, teammate_env, "exp", "pull", "origin", "one-layer")
    dvc(teammate, teammate_env, "exp", "apply", "one-layer")
    dvc(teammate, teammate_env, "pull")
    assert cached_outputs(teammate) == experiment
    assert_restored(teammate, teammate_env)
