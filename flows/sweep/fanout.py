"""The sweep's fan-out: submit one child flow run per selection, then follow them through the Prefect API (its
client retries a busy server's 429/502/503 answers and dropped connections, PREFECT_CLIENT_MAX_RETRIES times) until
each is completed, submitted again (it crashed, or failed on a transient error) or failed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from prefect import get_run_logger

from flows.sweep.child import RESULT_TYPE
from flows.workspace import PipelineError

# A selection's status in the parent: pending -> running -> completed | failed; or, without a child, up to date
# (already in the parent's workspace) or in parent (the parent runs it: the baseline, runs scored for importance).
PENDING, RUNNING, COMPLETED, FAILED = "pending", "running", "completed", "failed"
UP_TO_DATE, IN_PARENT = "up to date", "in parent"


@dataclass
class Child:
    """One selection's child flow run(s) as the parent follows them."""

    selection: str
    attempt: int = 0
    run_id: str | None = None
    run_name: str | None = None
    submitted: float = 0.0
    state: str = ""  # the Prefect state type last seen
    status: str = PENDING
    message: str = ""
    result: dict | None = None  # the completed child's result artifact
    history: list[str] = field(default_factory=list)


def classify(state_type: str, message: str | None) -> str:
    """What a final child state means: `completed`, `retry` (worth another attempt) or `failed`."""
    if state_type == "COMPLETED":
        return "completed"
    exc = (message or "").removeprefix("Flow run encountered an exception: ")
    if state_type == "CRASHED" or (state_type == "FAILED" and exc.startswith("TransientError:")):
        return "retry"
    return "failed"


def submit(child: Child, deployment: str, parameters: dict, sweep_id: str) -> None:
    """A new flow run of the child deployment for this selection (attempt n+1); returns at once."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    child.attempt += 1
    name = child.selection if child.attempt == 1 else f"{child.selection} (attempt {child.attempt})"
    try:
        run = run_deployment(deployment, parameters=parameters, timeout=0, flow_run_name=name,
                             tags=["visual-region", "sweep", f"sweep:{sweep_id}", f"selection:{child.selection}"],
                             idempotency_key=f"{sweep_id}:{child.selection}:{child.attempt}")
    except ObjectNotFound:
        raise PipelineError(f"deployment {deployment!r} not found on the Prefect server: register it with `make deploy` "
                            "(prefect deploy --all)") from None
    child.run_id, child.run_name, child.submitted = str(run.id), name, time.monotonic()
    child.state, child.status = "SCHEDULED", RUNNING


def read_result(client, run_id: str) -> dict | None:
    """The result artifact a completed child left (None: it left none)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
                                                                type=ArtifactFilterType(any_=[RESULT_TYPE])))
    if not arts:
        return None
    data = arts[-1].data
    return json.loads(data) if isinstance(data, str) else data


def fan_out(children: dict[str, Child], parameters: dict[str, dict], deployment: str, sweep_id: str, retries: int,
            timeout_s: float | None, poll_s: float) -> None:
    """Submit every child, then wait: each final state is gathered, retried (crashed / transient, at most `retries`
    more attempts) or recorded as failed; a child past `timeout_s` is cancelled and recorded as failed."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    logger = get_run_logger()
    for child in children.values():
        submit(child, deployment, parameters[child.selection], sweep_id)
        logger.info("submitted %s: flow run %s (%s)", child.selection, child.run_name, child.run_id)
    last_hint = time.monotonic()
    with get_client(sync_client=True) as client:
        while running := [c for c in children.values() if c.status == RUNNING]:
            time.sleep(poll_s)
            runs = {str(r.id): r for r in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[c.run_id for c in running])))}
            for child in running:
                run = runs.get(child.run_id)
                if run is not None and run.state is not None:
                    follow(client, child, run, deployment, parameters[child.selection], sweep_id, retries, timeout_s)
            if time.monotonic() - last_hint > 120:
                waiting = [c.run_name for c in children.values()
                           if c.status == RUNNING and c.state in ("SCHEDULED", "PENDING")]
                if waiting:
                    logger.info("waiting for a worker to take %s (the work pool and queue of deployment %s)",
                                ", ".join(waiting), deployment)
                last_hint = time.monotonic()


def follow(client, child: Child, run, deployment: str, parameters: dict, sweep_id: str, retries: int,
           timeout_s: float | None) -> None:
    """One look at a running child's flow run: log a new state; on a final one, complete, resubmit or fail it; past
    the timeout, cancel it."""
    from prefect.states import Cancelled, Cancelling

    logger = get_run_logger()
    state = run.state.type.value
    message = (run.state.message or "").removeprefix("Flow run encountered an exception: ")
    if state != child.state:
        logger.info("%s: %s%s", child.run_name, run.state.name, f" ({message})" if message else "")
        child.state = state
    if run.state.is_final():
        verdict = classify(state, message)
        child.history.append(f"attempt {child.attempt}: {run.state.name}{': ' + message if message else ''}")
        if verdict == "completed":
            child.result = read_result(client, child.run_id)
            if child.result is None:
                child.status = FAILED
                child.message = f"flow run {child.run_id} completed without a {RESULT_TYPE} artifact"
            else:
                child.status = COMPLETED
                ran_on = child.result["where"]
                logger.info("%s: done on worker %s (host %s) in %s s", child.run_name, ran_on.get("worker"),
                            ran_on.get("host"), child.result.get("seconds"))
        elif verdict == "retry" and child.attempt <= retries:
            logger.warning("%s: %s; submitting it again (attempt %d of %d)", child.run_name, message or run.state.name,
                           child.attempt + 1, retries + 1)
            submit(child, deployment, parameters, sweep_id)
        else:
            child.status, child.message = FAILED, f"{run.state.name}: {message}".rstrip(": ")
    elif timeout_s is not None and time.monotonic() - child.submitted > timeout_s:
        queued = state in ("SCHEDULED", "PENDING")  # never started: nothing for a worker to stop
        why = "the sweep's child_timeout_s ran out"
        client.set_flow_run_state(run.id, Cancelled(message=why) if queued else Cancelling(message=why), force=True)
        child.status = FAILED
        child.message = (f"did not finish within {timeout_s:.0f} s (it was {run.state.name}"
                         f"{'; is a worker polling its work pool and queue?' if queued else ''}); cancelled")
        child.history.append(f"attempt {child.attempt}: {child.message}")
