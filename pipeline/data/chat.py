"""The conversation format: one home for the image token and the chat template, used by training, calibration,
evaluation and the registry's `predict` alike (torch-free).

A model's format is its tokenizer's own chat template (`tokenizer.chat_template`, saved with the checkpoint). The
pipeline sets it when it builds or composes a model, from `model.chat_template` in params:

* ``plain``: ``<s>USER: {question} ASSISTANT: {answer}</s>USER: ...``, LLaVA-1.5's ``vicuna_v1`` without its system
  prompt: the tiny and micro profiles' format.
* ``vicuna_v1``: LLaVA-1.5's (``llava_v1``): the same with Vicuna's system prompt.
* ``tokenizer``: keep the language model's own template (e.g. Llama-3-Instruct's or Phi-3's, for Bunny-style models).

Answers are supervised and prompts are not: a conversation is rendered turn by turn and the text each assistant turn
adds is the answer's span. Rendered text carries its own special tokens (BOS, EOS, headers), so it is tokenised with
``add_special_tokens=False``.
"""

from __future__ import annotations

import functools
from typing import Any

from pipeline.data.schema import DataError
from pipeline.errors import ProjectError

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100  # labels of prompt tokens: no loss

_TURNS = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {{ message['content'] }} ASSISTANT:"
    "{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
TEMPLATES: dict[str, str] = {
    "plain": "{{ bos_token }}" + _TURNS,
    "vicuna_v1": "{{ bos_token }}" + VICUNA_SYSTEM + " " + _TURNS,
}
TEMPLATE_CHOICES = (*TEMPLATES, "tokenizer")


class ChatTemplateError(ProjectError, ValueError):
    """A tokenizer without a usable chat template."""


class OverLengthError(DataError):
    """A sample is longer than max_length and the params say refuse (`on_overflow: refuse`)."""


def set_chat_template(tokenizer, name: str) -> None:
    """Give `tokenizer` the template `name` (one of TEMPLATE_CHOICES); ``tokenizer`` keeps its own."""
    if name == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError("model.chat_template is 'tokenizer' but the language model's tokenizer has none; "
                                    f"choose one of {sorted(TEMPLATES)}")
        return
    if name not in TEMPLATES:
        raise ChatTemplateError(f"model.chat_template must be one of {list(TEMPLATE_CHOICES)}, got {name!r}")
    tokenizer.chat_template = TEMPLATES[name]


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _render(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatTemplateError("the tokenizer has no chat template (model.chat_template sets one when the model "
                                "is built or composed)")
    return _compiled(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
    )


def to_messages(conversations: list[dict[str, str]]) -> list[dict[str, str]]:
    """LLaVA turns ({"from": "human"|"gpt", "value"}) -> chat messages ({"role": "user"|"assistant", "content"})."""
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[turn["from"]], "content": turn["value"]} for turn in conversations]


def segments(tokenizer, conversations: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_answer) pieces, in order; their concatenation is the whole render."""
    messages = to_messages(conversations)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:k], add_generation_prompt=True)
        full = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ChatTemplateError("the chat template does not render a conversation turn by turn (each render must "
                                    "extend the previous one), so answer tokens cannot be told from prompt tokens")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces


def generation_prompt(tokenizer, question: str) -> str:
    """The text a model continues with its answer to one user turn (`question` may hold the image token)."""
    return _render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)


def conversation_text(tokenizer, conversations: list[dict[str, str]]) -> str:
    """A whole conversation rendered, answers included (calibration sees what training saw)."""
    return "".join(text for text, _ in segments(tokenizer, conversations))


def encode_conversation(
    tokenizer, conversations: list[dict[str, Any]], *, n_image_tokens: int, max_length: int, on_overflow: str,
    record_id: str,
) -> tuple[list[int], list[int], bool]:
    """Token ids and labels (every answer token, in every turn; IGNORE_INDEX elsewhere) for one LLaVA conversation;
    `<image>` is expanded to the vision tower's number of patch tokens. Returns (input_ids, labels, truncated).
    Raises DataError naming `record_id` for a malformed conversation, OverLengthError when too long and
    `on_overflow` is ``refuse``."""
    turns = list(conversations)
    if len(turns) % 2 or not turns:
        raise DataError(f"record {record_id}: field 'conversations' must alternate human/gpt turns, got {len(turns)} turns")
    for k in range(0, len(turns), 2):
        if turns[k].get("from") != "human" or turns[k + 1].get("from") != "gpt":
            raise DataError(f"record {record_id}: field 'conversations' turn {k} must be human then gpt")
    expanded = [
        {"from": t["from"], "value": t["value"].replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens)
         if t["from"] == "human" else t["value"].strip()}
        for t in turns
    ]
    ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in segments(tokenizer, expanded):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    truncated = len(ids) > max_length
    if truncated:
        if on_overflow == "refuse":
            raise OverLengthError(
                f"record {record_id}: {len(ids)} tokens exceed max_length {max_length} (on_overflow: refuse)"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels, truncated



def plain_text(question: str, answer: str) -> str:
    """One exchange in the `plain` format without BOS/EOS: the tiny LM's pretraining texts in the chat format."""
    return _compiled(TEMPLATES["plain"]).render(
        messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        bos_token="", eos_token="",
    )


def processor_inputs(processor, records: list[dict], *, with_answers: bool, padding_side: str) -> dict:
    """Model inputs for a batch of visual records (text-only ones included: only the images there are go in, in
    order, as LLaVA matches them to the `<image>` tokens). `with_answers`: the whole conversation, as training saw it
    (calibration); otherwise the first question's generation prompt (evaluation, prediction)."""
    from pipeline.data.images import to_rgb

    tokenizer = processor.tokenizer
    tokenizer.padding_side = padding_side
    if with_answers:
        texts = [conversation_text(tokenizer, r["conversations"]) for r in records]
    else:
        texts = [generation_prompt(tokenizer, r["conversations"][0]["value"]) for r in records]
    images = [to_rgb(r["image"]) for r in records if r.get("image") is not None]
    return dict(processor(images=images or None, text=texts, padding=True, return_tensors="pt",
                          add_special_tokens=False))
