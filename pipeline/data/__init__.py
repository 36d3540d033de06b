"""The data layer, one module per concern (none imports torch):

* ``schema``: the prepared datasets' layout and record schema, DataError, the manifest. DataConfig, the data params,
  is defined with the params schema (pipeline/config.py) and re-exported here.
* ``synthetic``: the tiny world (shape scenes, digits, the text corpus and text QA), generated from a seed.
* ``llava``: the LLaVA-format importer (JSON / JSONL of any size, validated in parallel, images kept as their bytes).
* ``images``: images as the pipeline reads them (upright 8-bit RGB).
* ``chat``: the image token and the chat template: how a conversation becomes prompt and answer tokens.
* ``prepare``: stage `prepare`'s library, writing data/prepared atomically.
* ``encoding`` (imports torch; import it as ``pipeline.data.encoding``): training samples, eager or lazy, the
  collator and the modality-length sampler.

The names below are the package's public API.
"""

from pipeline.config import DataConfig
from pipeline.data.chat import IMAGE_TOKEN, TEMPLATES, encode_conversation, generation_prompt
from pipeline.data.images import to_rgb
from pipeline.data.llava import ImportReport, import_llava_json
from pipeline.data.prepare import build_text, build_visual, prepare_all, text_corpus_chunks
from pipeline.data.schema import (
    IMPORTED_SPLIT, MANIFEST_FILE, TEXT_DIR, TEXT_FEATURES, TEXT_QA_DIR, TEXT_QA_FEATURES, TEXT_SPLITS,
    VISION_PAIRS_SPLIT, VISUAL_DIR, VISUAL_FEATURES, VISUAL_SPLITS, DataError, content_hash, read_manifest,
)
from pipeline.data.synthetic import (
    BACKGROUND, CAPTION_PROMPTS, COLOURS, DIGIT_PROMPT, GRID, PALETTE, QTYPES, SHAPES, Shape, chunk_text,
    describe_scene, digit_caption, digit_image, draw_scene, load_pydoc_topics, make_caption_record,
    make_digit_records, make_question, make_scene_texts, make_text_qa, make_vqa_record, make_vqa_records,
    pack_paragraphs, png_bytes, split_indices, split_paragraphs, split_text_documents, text_qa_as_text,
    text_qa_prompt,
)

__all__ = [
    "BACKGROUND", "CAPTION_PROMPTS", "COLOURS", "DIGIT_PROMPT", "GRID", "IMAGE_TOKEN", "IMPORTED_SPLIT", "MANIFEST_FILE",
    "PALETTE", "QTYPES", "SHAPES", "TEMPLATES", "TEXT_DIR", "TEXT_FEATURES", "TEXT_QA_DIR", "TEXT_QA_FEATURES",
    "TEXT_SPLITS", "VISION_PAIRS_SPLIT", "VISUAL_DIR", "VISUAL_FEATURES", "VISUAL_SPLITS", "DataConfig", "DataError",
    "ImportReport", "Shape", "build_text", "build_visual", "chunk_text", "content_hash", "describe_scene",
    "digit_caption", "digit_image", "draw_scene", "encode_conversation", "generation_prompt", "import_llava_json",
    "load_pydoc_topics", "make_caption_record", "make_digit_records", "make_question", "make_scene_texts",
    "make_text_qa", "make_vqa_record", "make_vqa_records", "pack_paragraphs", "png_bytes", "prepare_all",
    "read_manifest", "split_indices", "split_paragraphs", "split_text_documents", "text_corpus_chunks",
    "text_qa_as_text", "text_qa_prompt", "to_rgb",
]
