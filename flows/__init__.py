"""Orchestration around the DVC pipeline: Prefect flows for the stages (stages.py), the scheduled pipeline (pipeline.py)
and the layer-selection sweep (sweep/), the study as a DVC experiment queue (queue.py), the workspace commands they
share (workspace.py: dvc, git, retries, the remote, the lock), and the local services (services.py: SeaweedFS S3, MLflow
server, Prefect server) they talk to. The library (`pipeline/`) knows nothing of this."""
