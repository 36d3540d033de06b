"""The training stages' entry (tune, pretrain_projector): with $VR_LAUNCHER set (e.g. `torchrun --standalone
--nproc_per_node 8`), the stage runs under that launcher and exits with its exit code (pipeline/distributed.py,
docs/multi-gpu.md); under a launcher, only rank 0 is a Prefect flow run, the other ranks run the stage directly."""

from __future__ import annotations

import sys
from collections.abc import Callable

from stages._common import configure_logging, log, run


def run_launchable(main: Callable[[list[str]], None], module: str, *,
                   outage: Callable[[BaseException], BaseException | None] | None = None) -> None:
    """`stages._common.run(main, outage=outage)`, relaunched under $VR_LAUNCHER when it is set; `module`: the
    stage's module (`stages.tune`), which the launcher runs."""
    from pipeline.distributed import is_main, launcher_command, relaunch

    configure_logging()
    command = launcher_command(module, sys.argv[1:])
    if command:
        log.info("running under %s: %s", "VR_LAUNCHER", " ".join(command))
        sys.exit(relaunch(command))
    run(main, outage=outage, as_flow=is_main())
