"""Stage `prepare`: synthetic scenes, digits, text corpus and text QA as Hugging Face datasets on disk."""

from stages._common import load_params, run


def main(argv: list[str]) -> None:
    from pipeline import data
    from pipeline.storage import atomic_write_json

    params = load_params()
    counts = data.prepare_all(params.data, "data/prepared")
    atomic_write_json("metrics/data.json", counts)


if __name__ == "__main__":
    run(main)
