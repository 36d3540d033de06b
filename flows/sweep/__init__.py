"""A layer-selection sweep spread across Prefect workers: one flow run per entry of `tune.runs` /
`tune.importance_runs`, each in a workspace of its own, gathered into one study report.

The parent flow `visual-region-sweep` (parent.py), in its workspace (a git clone with the DVC remote set up):

1. refuses, in a deployment's run, a workspace that `make deploy` did not prepare (as flows/pipeline.py does: it may
   be someone's checkout); locks the workspace, checks the endpoints, `dvc pull`s what the remote already has, and
   starts from the committed params.yaml with `params_file` copied onto it (the params are validated here);
2. plans (plan.py, from dvc.yaml's stages and the params): the stages of each selection (`tune@X`, `prune@X`,
   `evaluate@X`, or the `*_importance` ones), and the shared upstream the selections read: prepare, build_base,
   pretrain_projector and the baseline `all` (and any run an importance run is scored on);
3. runs that upstream itself (`dvc repro <those stages>`) and `dvc push`es it: the children pull it from the remote;
4. submits one flow run of the `sweep-child` deployment per selection whose stages are not already up to date here
   (a re-run after a failure only redoes what failed), and follows them (fanout.py);
5. gathers (gather.py): each child's dvc.lock entries are merged into this workspace's dvc.lock, its small uncached
   outputs (metrics, plots: DVC does not push them) are fetched, its cached outputs are `dvc pull`ed, and
   `dvc status` must then call its stages up to date (else its code or inputs differed from this workspace's);
6. with every selection gathered, `dvc repro` (only pruning_curve, report and register are left to run), `dvc push`,
   and the markdown artifact `visual-region-sweep`: per selection its worker, host, attempts and scores, then the
   report. A failed selection is named in that artifact and in the flow's error; the others are still gathered.

A child, `visual-region-sweep-child` (child.py), on whichever worker of the pool takes it: `git clone` of the repo at
the parent's commit into a fresh directory (under $VR_SWEEP_DIR, default <tmp>/vr-sweep), the parent's params.yaml
and dvc.lock written on top, `dvc pull` of just the outputs its stages read, `dvc repro --single-item` of each of its
stages in order, `dvc push` of their outputs, its uncached outputs sent back, and a result artifact (type
`vr-sweep-result`) that the parent reads through the Prefect API. Stages log to MLflow as always (MLFLOW_TRACKING_URI
from the worker's environment), under the same parent run as the rest of the sweep.

How the data travels: models and data through the DVC remote (`dvc push` / `dvc pull`), runs and metrics through
MLflow, and the small files DVC does not push through an exchange area in the same DVC remote (exchange.py:
`<remote>/sweeps/<sweep flow run id>/<selection>/`, one tarball each way, through DVC's own filesystem for the
remote): to the child, the parent's params.yaml, dvc.lock and the uncached outputs its stages read (an importance
run's scores of `all`); back, its stages' uncached outputs. Prefect carries only metadata: the child's parameters
(commit, stage names, paths, the remote) and its result artifact (its dvc.lock entries, the key of its outputs in the
exchange area, the worker, host and pid it ran on, its seconds). The parent removes its exchange area when it ends.

Retries: the DVC pulls and pushes, the exchange transfers and the endpoint checks retry transient failures
(flows/workspace.py); the Prefect client retries a busy API's 429/502/503 answers; a child that crashed (its process
or worker died) or failed with a TransientError is submitted again, at most `child_retries` times. A child that
failed on anything else (a bad layer list, a training error) is not retried, and its clone is kept to look at.

    python -m flows.sweep --params-file params/study.yaml          # the parent here, the children on the workers
    prefect deployment run visual-region-sweep/sweep                # the parent on a worker too (queue `sweep`)
"""
