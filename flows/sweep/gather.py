"""The sweep's gathering: a completed child's results merged into the parent's workspace (its dvc.lock entries from
its result artifact, its uncached outputs from the exchange area, its cached outputs from the DVC remote), and the
markdown summary of the whole sweep."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

import yaml
from flows.pipeline import summary_markdown
from flows.sweep import exchange
from flows.sweep.fanout import COMPLETED, FAILED, IN_PARENT, UP_TO_DATE, Child
from flows.sweep.plan import Selection
from flows.workspace import PipelineError, dvc_pull, dvc_status

GATHERED = (COMPLETED, UP_TO_DATE, IN_PARENT)  # statuses whose outputs are in the parent's workspace


def merge_lock(workspace: Path, entries: dict[str, dict]) -> None:
    """Put stage entries (as another workspace's dvc.lock has them) into this workspace's dvc.lock."""
    path = workspace / "dvc.lock"
    lock = (yaml.safe_load(path.read_text()) if path.exists() else None) or {"schema": "2.0", "stages": {}}
    lock.setdefault("stages", {}).update(entries)
    tmp = path.with_name(".dvc.lock.sweep-tmp")
    tmp.write_text(yaml.safe_dump(lock, sort_keys=False, allow_unicode=True))
    os.replace(tmp, path)


def git_ignore(workspace: Path, paths: list[str]) -> None:
    """What `dvc repro` would have added to .gitignore for these outputs (`dvc pull` does not): `/<name>` in the
    .gitignore next to each, so that a `git add -A` of the results never takes in a model."""
    if not (workspace / ".git").exists():
        return
    for rel in paths:
        p = PurePosixPath(rel)
        gitignore, entry = workspace / p.parent / ".gitignore", f"/{p.name}"
        lines = gitignore.read_text().splitlines() if gitignore.exists() else []
        if entry not in lines:
            gitignore.parent.mkdir(parents=True, exist_ok=True)
            gitignore.write_text("\n".join([*lines, entry]) + "\n")


def gather(workspace: Path, child: Child, selection: Selection, remote: str | None) -> None:
    """Merge a completed child into this workspace; on a mismatch, the child is recorded as failed."""
    result = child.result or {}
    try:
        if sorted(result.get("lock", {})) != sorted(selection.stages):
            raise PipelineError(f"its result has dvc.lock entries for {sorted(result.get('lock', {}))}, "
                                f"expected {selection.stages}")
        merge_lock(workspace, result["lock"])
        exchange.receive_files(workspace, remote, result["outputs_key"], [*selection.outputs, exchange.RUN_RECORDS],
                               f"child {child.selection}")
        dvc_pull(workspace, remote, selection.stages)
        if changed := dvc_status(workspace, selection.stages):
            raise PipelineError(f"after merging, DVC still calls its stages changed here: {json.dumps(changed)[:1500]} "
                                f"(did the child run other code or inputs than this workspace's?)")
        git_ignore(workspace, selection.cached)
    except PipelineError as err:
        child.status, child.message = FAILED, f"gathering its results: {err}"


# ------------------------------------------------------------------------------------------------- the summary
def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def selection_rows(workspace: Path, children: dict[str, Child]) -> list[str]:
    lines = ["| selection | status | worker | host | attempts | child flow run | visual | text QA | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, child in children.items():
        scores = workspace / "metrics" / "eval" / f"{name}.json"
        tuned = json.loads(scores.read_text()).get("tuned", {}) if child.status in GATHERED and scores.exists() else {}
        ran_on = (child.result or {}).get("where", {})
        note = child.message.replace("|", "/").replace("\n", " ")[:300]
        lines.append(f"| {name} | {child.status} | {ran_on.get('worker') or '-'} | {ran_on.get('host') or '-'} | "
                     f"{child.attempt} | {child.run_name or '-'} | {_number(tuned.get('visual_score'))} | "
                     f"{_number(tuned.get('text_qa_accuracy'))} | {note} |")
    return lines


def sweep_markdown(workspace: Path, commit: str, children: dict[str, Child], report_ran: bool) -> str:
    failed = [name for name, child in children.items() if child.status == FAILED]
    head = ["# visual-region sweep", "", f"- workspace: `{workspace}`, commit `{commit[:12]}`",
            f"- selections: {len(children)}; failed: {', '.join(failed) if failed else 'none'}",
            f"- report: {'written (below)' if report_ran else 'not written: every selection must finish first'}", "",
            "## Selections", "", *selection_rows(workspace, children), ""]
    # the pipeline flow's summary without its title: the report, MLflow links, the registry (only once written)
    body = ""
    if report_ran:
        body = summary_markdown(workspace, "dvc repro (the sweep's last step)", pushed=True).split("\n", 1)[1]
    return "\n".join(head) + "\n" + body
