"""The base of the project's own errors: something outside the code is wrong (params, data, a model this project
cannot handle, a missing input, an unreachable service) and the message names it. A stage prints such an error as one
line and exits 2 (stages/_common.py); any other exception is a bug and keeps its traceback (exit 1).

Each concrete error lives beside its concept (ParamsError in config, DataError in data.schema, ModelStructureError in
model, TrackingError in tracking, RegistryError in registry, ServiceError in flows.services) and derives from
ProjectError. It also derives from the builtin it refines (ValueError, RuntimeError, FileNotFoundError), so callers that
catch the builtin keep working."""

from __future__ import annotations


class ProjectError(Exception):
    """An expected failure about an input or a service, named in the message."""


class MissingInputError(ProjectError, FileNotFoundError):
    """An input the stage needs (a model directory, a params file, a dataset) is not there; the message names the path
    and what produces it."""


class OutputError(ProjectError, OSError):
    """An output could not be written (permission denied, disk full, a read-only file system); the message names the
    output and the path the system refused."""


class OutputBusyError(OutputError):
    """Another process holds the lock on the outputs this stage would write; the message names its pid."""
