"""Stage `prepare`: synthetic scenes, digits, text corpus and text QA (and any LLaVA-format data params name) as
Hugging Face datasets on disk (pipeline/data/prepare.py)."""

from stages import _inputs as inputs, _paths as paths
from stages._common import run


def main(argv: list[str]) -> None:
    from pipeline import data
    from pipeline.storage import atomic_write_json

    params = inputs.load_params()
    counts = data.prepare_all(params.data, paths.PREPARED)
    atomic_write_json(paths.stage_metrics("data"), counts)


if __name__ == "__main__":
    run(main)
