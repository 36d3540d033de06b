"""docs/orchestration.md's registry example, as the tests run it: the block as written (with another model name),
and the checkpoint's own greedy answer to the same scene, to compare with what the block prints."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "orchestration.md"
DOC_MODEL = "models:/visual-region-tiny-all@champion"

# The registered checkpoint's answer, straight from pipeline.registry's pyfunc class on the pruned `all` model.
DIRECT_ANSWER = (
    "import io, types, pandas as pd; from datasets import load_from_disk; from pipeline.registry import VisionLanguageModel;"
    "scene = load_from_disk('data/prepared/visual')['vqa_test'][0]; png = io.BytesIO(); scene['image'].save(png, format='PNG');"
    "q = scene['conversations'][0]['value'].replace('<image>', '').strip(); m = VisionLanguageModel();"
    "m.load_context(types.SimpleNamespace(artifacts={'checkpoint': 'models/pruned/all'}));"
    "print(repr(m.predict(None, pd.DataFrame({'image': [png.getvalue()], 'question': [q]}), {'max_new_tokens': 8})[0]))"
)


def doc_block(model_uri: str) -> str:
    """The doc's first python block, loading `model_uri` instead of the tiny default's champion."""
    block = DOC.read_text().split("```python\n")[1].split("```")[0]
    assert DOC_MODEL in block, "the docs' registry example no longer loads " + DOC_MODEL
    return block.replace(DOC_MODEL, model_uri)


def assert_answers_as_the_checkpoint(printed: str, expected: str) -> None:
    """`printed` (the block's last line: `<question> -> <answer> (expected <answer>)`) carries `expected`."""
    question = printed.split(" -> ")[0]
    assert question.endswith("?") and "<image>" not in question, printed
    assert f" -> {expected} (expected " in printed, (printed, expected)
