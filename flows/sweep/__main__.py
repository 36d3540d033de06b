"""`python -m flows.sweep`: the parent in this process, the children on the workers of the child deployment."""

from __future__ import annotations

import argparse
import sys

from flows.services import check_prefect_api
from flows.sweep.parent import CHILD_DEPLOYMENT, NEEDS_PREFECT, sweep
from pipeline.errors import ProjectError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=sweep.__doc__.split("\n")[0])
    parser.add_argument("--workspace", help="the repo clone to run in (default: this one)")
    parser.add_argument("--params-file", default="params/study.yaml", help="the params to sweep (default: %(default)s)")
    parser.add_argument("--no-pull", action="store_true", help="do not `dvc pull` first")
    parser.add_argument("--remote", help="the DVC remote (default: the workspace's default remote)")
    parser.add_argument("--repo-url", help="where children clone from (default: origin, else this workspace's path)")
    parser.add_argument("--child-deployment", default=CHILD_DEPLOYMENT)
    parser.add_argument("--child-retries", type=int, default=1)
    parser.add_argument("--child-timeout", type=float, help="seconds before a child is cancelled and counted failed")
    parser.add_argument("--poll", type=float, default=10.0, help="seconds between looks at the children's states")
    args = parser.parse_args(argv)
    try:
        check_prefect_api(required_for=NEEDS_PREFECT)  # before Prefect would start a server of its own
        sweep(workspace=args.workspace, params_file=args.params_file, pull=not args.no_pull, remote=args.remote,
              repo_url=args.repo_url, child_deployment=args.child_deployment, child_retries=args.child_retries,
              child_timeout_s=args.child_timeout, poll_s=args.poll)
    except ProjectError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
