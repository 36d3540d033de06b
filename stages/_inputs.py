"""Reading a stage's inputs (params, prepared data, other stages' outputs) so that a missing or unreadable one is a
project error naming it and the DVC stage that writes it, not a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.data.schema import DataError
from pipeline.errors import MissingInputError
from stages import _paths as paths


def load_params(path: str = "params.yaml"):
    """params.yaml (or the file $VR_PARAMS names), validated (pipeline/config.py)."""
    from pipeline import config

    params = config.load(os.environ.get("VR_PARAMS", path))
    if params.model.profile != "hf":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the offline profiles never touch a hub
    return params


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def stage_name(params, stage: str, run: str) -> str:
    """DVC's name of a per-run stage: `tune@uniform25`, or `tune_importance@bi25` for an entry of tune.importance_runs."""
    return f"{stage}_importance@{run}" if run in params.tune.importance_runs else f"{stage}@{run}"


def need(path: Path, written_by: str) -> Path:
    """`path`, or a MissingInputError naming it and the DVC stage that writes it."""
    if not path.exists():
        raise MissingInputError(f"{path} is missing: `dvc repro {written_by}` writes it")
    return path


def read_json(path: Path, written_by: str, fields: tuple[str, ...] = ()):
    """The JSON at `path`: an object with `fields` when they are given."""
    try:
        content = json.loads(need(path, written_by).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}): re-run `dvc repro {written_by}`", path=str(path)) from None
    for field in fields:
        if not isinstance(content, dict) or field not in content:
            raise DataError(f"{path} has no field {field!r}: re-run `dvc repro {written_by}`", path=str(path), field=field)
    return content


def prepared(name: str):
    """The prepared dataset `name` (e.g. pipeline.data.VISUAL_DIR) from data/prepared."""
    import datasets

    path = need(paths.PREPARED / name, "prepare")
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as err:  # a directory, but not a saved dataset
        raise DataError(f"{path} is not a prepared dataset ({err}): re-run `dvc repro prepare`", path=str(path)) from None
