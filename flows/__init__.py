"""Orchestration around the DVC pipeline: Prefect flows for the stages and the scheduled pipeline, and the local
services (SeaweedFS S3, MLflow server, Prefect server) they talk to. The library (`pipeline/`) knows nothing of this."""
