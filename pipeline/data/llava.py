"""The LLaVA-format importer: a JSON list or JSONL of any size (LLaVA-Pretrain-558K, LLaVA-665K) validated into the
prepared schema, in bounded memory and in parallel.

1. The source file is read as a stream (never whole) into a work file of one raw record per line, with the offsets
   of every ``CHUNK`` records.
2. ``num_proc`` processes validate chunks of it (``datasets.Dataset.from_generator``, written to Arrow as they go):
   every field is checked and every image is opened and decoded once, with the same one-line errors as ever (file,
   record, field, reason). An image is stored as the file's own bytes, never re-encoded: a JPEG stays a JPEG, and
   the mode conversion (``llava_image_mode: convert``) and EXIF orientation are applied when it is read
   (``pipeline.data.images.to_rgb``).
3. Bad records are raised (``on_error: raise``, the first one in file order) or counted per reason and logged
   (``skip``).

Text-only records (no ``image``, as ShareGPT's in LLaVA-665K) are kept with image None; multi-turn conversations are
kept whole.

Longer than 400 lines on purpose: reading, validating and reporting share one vocabulary of record, field and
reason, and the steps above only make sense together."""

from __future__ import annotations

import atexit
import codecs
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow.compute
from PIL import Image

from pipeline.data.chat import IMAGE_TOKEN
from pipeline.data.schema import VISUAL_FEATURES, DataError

logger = logging.getLogger(__name__)

CHUNK = 1000  # records per unit of parallel work
_READ_BYTES = 1 << 20
_MAX_RECORD_BYTES = 64 << 20  # a JSON-list record that does not parse within this many characters is malformed
_STATUS_FEATURES = {
    "index": datasets.Value("int64"), "error": datasets.Value("string"), "reason": datasets.Value("string"),
    "error_field": datasets.Value("string"), "error_id": datasets.Value("string"),
    "converted": datasets.Value("string"), "frames": datasets.Value("int64"),
}
_WORK_FEATURES = datasets.Features({**VISUAL_FEATURES, **_STATUS_FEATURES})


@dataclass
class ImportReport:
    source: str
    imported: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)  # the first MAX_MESSAGES, in file order
    converted_modes: dict[str, int] = field(default_factory=dict)
    animated: int = 0  # records whose image has several frames (GIF, APNG, WebP, TIFF pages): the first one is used
    seconds: float = 0.0

    MAX_MESSAGES = 1000

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


class _Ctx:
    """Formats DataErrors for one record."""

    def __init__(self, path: Path, index: int, line: int | None) -> None:
        self.path = path
        self.index = index
        self.line = line
        self.record_id: str | None = None

    def error(self, field_name: str, reason: str, problem: str) -> DataError:
        where = f"record {self.index}"
        if self.line is not None:
            where += f" (line {self.line})"
        rid = "<missing>" if self.record_id is None else repr(self.record_id)
        msg = f"{self.path}: {where}, id={rid}, field '{field_name}': {problem} [{reason}]"
        return DataError(
            msg, path=str(self.path), index=self.index, record_id=self.record_id,
            field=field_name, reason=reason,
        )


def _utf8_error(path: Path, offset: int, exc: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not valid UTF-8 at byte {offset + exc.start} [malformed_json]",
                     path=str(path), field="<json>", reason="malformed_json")


def _jsonl_records(path: Path) -> Iterator[tuple[int | None, Any] | DataError]:
    offset = 0
    with open(path, "rb") as f:
        index = 0
        for lineno, raw_line in enumerate(f, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _utf8_error(path, offset, exc) from None
            offset += len(raw_line)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                yield DataError(
                    f"{path}: record {index} (line {lineno}), id=<unknown>, field '<json>': "
                    f"malformed JSON: {exc.msg} at column {exc.colno} [malformed_json]",
                    path=str(path), index=index, field="<json>", reason="malformed_json",
                )
            index += 1


class _JsonListReader:
    """The records of a top-level JSON list, one at a time: the file is read in 1 MiB pieces and only the text not
    yet parsed is kept. Errors give the line and column in the whole file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "rb")
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.bytes_read = 0
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.lines_before = 0  # newlines in the text dropped from the front of buf
        self.col_before = 0  # characters of buf's first line that were dropped

    def _more(self) -> bool:
        if self.eof:
            return False
        data = self.file.read(_READ_BYTES)
        try:
            self.buf += self.utf8.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise _utf8_error(self.path, self.bytes_read, exc) from None
        self.bytes_read += len(data)
        self.eof = not data
        return True

    def _drop_parsed(self) -> None:
        done = self.buf[: self.pos]
        newlines = done.count("\n")
        if newlines:
            self.lines_before += newlines
            self.col_before = self.pos - (done.rfind("\n") + 1)
        else:
            self.col_before += self.pos
        self.buf, self.pos = self.buf[self.pos :], 0

    def _malformed(self, msg: str, lineno: int, colno: int) -> DataError:
        line = self.lines_before + lineno
        col = colno + (self.col_before if lineno == 1 else 0)
        return DataError(f"{self.path}: malformed JSON at line {line} column {col}: {msg} [malformed_json]",
                         path=str(self.path), field="<json>", reason="malformed_json")

    def _skip_space(self) -> str | None:
        """The next non-space character (not consumed), or None at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            self._drop_parsed()
            if not self._more() or (self.eof and not self.buf):
                return None

    def _position(self) -> tuple[int, int]:
        before = self.buf[: self.pos]
        lineno = before.count("\n") + 1
        return lineno, self.pos - (before.rfind("\n") + 1) + 1

    def __iter__(self) -> Iterator[tuple[None, Any]]:
        decoder = json.JSONDecoder()
        try:
            first = self._skip_space()
            if first != "[":
                if first is None:
                    raise self._malformed("Expecting value", *self._position())
                if first == "{":
                    raise DataError(f"{self.path}: top-level JSON must be a list of records, got dict [wrong_type]",
                                    path=str(self.path), field="<root>", reason="wrong_type")
                raise DataError(f"{self.path}: top-level JSON must be a list of records [wrong_type]",
                                path=str(self.path), field="<root>", reason="wrong_type")
            self.pos += 1
            count = 0
            while True:
                nxt = self._skip_space()
                if nxt is None:
                    raise self._malformed("unterminated list (the file ends before its closing ']')", *self._position())
                if nxt == "]":
                    self.pos += 1
                    if self._skip_space() is not None:
                        raise self._malformed("Extra data", *self._position())
                    return
                if count:
                    if nxt != ",":
                        raise self._malformed("Expecting ',' delimiter", *self._position())
                    self.pos += 1
                    if self._skip_space() is None:
                        raise self._malformed("Expecting value", *self._position())
                while True:
                    try:
                        obj, end = decoder.raw_decode(self.buf, self.pos)
                        break
                    except json.JSONDecodeError as exc:
                        # Most likely the record runs past what has been read: read on, up to a bound
                        if len(self.buf) - self.pos < _MAX_RECORD_BYTES and self._more():
                            continue
                        raise self._malformed(exc.msg, exc.lineno, exc.colno) from None
                self.pos = end
                count += 1
                if self.pos > _READ_BYTES:
                    self._drop_parsed()
                yield None, obj
        finally:
            self.file.close()


def _read_llava_file(path: Path) -> Iterator[tuple[int | None, Any] | DataError]:
    """(line or None, raw record) | DataError (a malformed JSONL line), in file order, streamed."""
    if not path.is_file():
        raise DataError(f"{path}: LLaVA JSON file not found", path=str(path), reason="missing_file")
    if path.suffix.lower() == ".jsonl":
        return _jsonl_records(path)
    return iter(_JsonListReader(path))


def _image_path(ctx: _Ctx, image_dir: Path, name: str, absolute_paths: bool = False) -> Path:
    """`name` resolved inside `image_dir`; a path that leaves it (absolute, or `..`) is refused. With
    `absolute_paths` an absolute path is taken as it is (a relative one must still stay inside)."""
    rel = Path(name)
    if rel.is_absolute() and absolute_paths:
        return rel
    root = image_dir.resolve()
    full = (root / rel).resolve()
    if rel.is_absolute() or not full.is_relative_to(root):
        hint = " (data.llava_absolute_image_paths: true allows absolute paths)" if rel.is_absolute() else ""
        raise ctx.error("image", "image_outside_dir",
                        f"image path {name!r} leaves the image folder {image_dir}{hint}")
    return image_dir / rel


def _read_image(ctx: _Ctx, image_path: Path, image_mode: str) -> tuple[bytes, str | None, int]:
    """The file's bytes, once PIL has decoded them whole; the mode to convert from (None: RGB already); and its
    number of frames (an animated image is read as its first frame, as PIL opens it)."""
    if not image_path.is_file():
        raise ctx.error("image", "missing_image", f"image file not found: {image_path}")
    data = image_path.read_bytes()
    if not data:
        raise ctx.error("image", "zero_size_image", f"image file is empty (0 bytes): {image_path}")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        with Image.open(io.BytesIO(data)) as img:
            mode, size, frames = img.mode, img.size, int(getattr(img, "n_frames", 1))
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))  # decodes every byte, 1/8 scale
            img.load()
    except Exception as exc:  # PIL raises many types for broken files
        raise ctx.error("image", "corrupt_image", f"cannot decode image {image_path}: {exc}") from exc
    if size[0] == 0 or size[1] == 0:
        raise ctx.error("image", "zero_size_image", f"image has zero size {size}: {image_path}")
    if mode == "RGB":
        return data, None, frames
    if image_mode == "refuse":
        raise ctx.error("image", "image_mode", f"image mode {mode!r} is not RGB (image_mode='refuse'): {image_path}")
    return data, mode, frames


def _normalise_record(raw: Any, ctx: _Ctx, image_dir: Path, image_mode: str,
                      absolute_paths: bool = False) -> tuple[dict, str | None, int]:
    """The record in the prepared schema, the mode its image will be converted from (None: already RGB), and the
    image's number of frames (0: no image)."""
    if not isinstance(raw, dict):
        raise ctx.error("<record>", "wrong_type", f"record must be an object, got {type(raw).__name__}")
    if "id" not in raw:
        raise ctx.error("id", "missing_field", "missing key 'id'")
    rid = raw["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid).strip() == "":
        raise ctx.error("id", "wrong_type", f"'id' must be a non-empty string or int, got {rid!r}")
    ctx.record_id = str(rid)
    if "conversations" not in raw:
        raise ctx.error("conversations", "missing_field", "missing key 'conversations'")
    convs = raw["conversations"]
    if not isinstance(convs, list) or not convs:
        raise ctx.error("conversations", "wrong_type", "'conversations' must be a non-empty list")
    turns: list[dict[str, str]] = []
    for t, turn in enumerate(convs):
        fname = f"conversations[{t}]"
        if not isinstance(turn, dict):
            raise ctx.error(fname, "wrong_type", f"turn must be an object, got {type(turn).__name__}")
        for key in ("from", "value"):
            if key not in turn:
                raise ctx.error(f"{fname}.{key}", "missing_field", f"missing key '{key}'")
            if not isinstance(turn[key], str):
                raise ctx.error(
                    f"{fname}.{key}", "wrong_type",
                    f"'{key}' must be a string, got {type(turn[key]).__name__}",
                )
        try:
            turn["value"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ctx.error(f"{fname}.value", "invalid_text",
                            f"text is not valid Unicode ({exc.reason} at character {exc.start})") from None
        if turn["from"] not in ("human", "gpt"):
            raise ctx.error(
                f"{fname}.from", "wrong_type", f"'from' must be 'human' or 'gpt', got {turn['from']!r}"
            )
        turns.append({"from": turn["from"], "value": turn["value"]})
    roles = [t["from"] for t in turns]
    if "human" not in roles:
        raise ctx.error("conversations", "missing_turn", "no 'human' turn")
    if "gpt" not in roles:
        raise ctx.error("conversations", "missing_turn", "no 'gpt' turn")
    for t, role in enumerate(roles):
        expected = "human" if t % 2 == 0 else "gpt"
        if role != expected:
            raise ctx.error(
                f"conversations[{t}].from", "turn_order",
                f"turns must alternate human/gpt starting with human; got {role!r} at turn {t}",
            )
    for t, turn in enumerate(turns):
        if turn["from"] == "gpt" and not turn["value"].strip():
            raise ctx.error(f"conversations[{t}].value", "empty_answer", "empty gpt answer")

    has_image = "image" in raw and raw["image"] is not None
    if has_image and (not isinstance(raw["image"], str) or not raw["image"].strip()):
        raise ctx.error("image", "wrong_type", f"'image' must be a non-empty string, got {raw['image']!r}")
    n_tokens = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    expected_tokens = 1 if has_image else 0
    if n_tokens != expected_tokens:
        raise ctx.error(
            "conversations", "image_token_mismatch",
            f"found {n_tokens} '{IMAGE_TOKEN}' tokens but the record has {expected_tokens} image(s)",
        )
    if has_image and IMAGE_TOKEN not in turns[0]["value"]:
        raise ctx.error(
            "conversations[0].value", "image_token_mismatch",
            f"'{IMAGE_TOKEN}' must be in the first human turn",
        )
    for t, turn in enumerate(turns):
        if turn["from"] == "human":
            question = turn["value"].replace(IMAGE_TOKEN, "").strip()
            if not question:
                raise ctx.error(f"conversations[{t}].value", "empty_question", "empty human question")
            turn["value"] = f"{IMAGE_TOKEN}\n{question}" if (t == 0 and has_image) else question
        else:
            turn["value"] = turn["value"].strip()

    image: dict | None = None
    converted, frames = None, 0
    if has_image:
        data, converted, frames = _read_image(ctx, _image_path(ctx, image_dir, raw["image"], absolute_paths), image_mode)
        image = {"bytes": data, "path": None}
    return {"id": ctx.record_id, "image": image, "conversations": turns, "qtype": "imported"}, converted, frames


def _stage_records(path: Path, work_file: Path) -> tuple[int, list[tuple[int, int]]]:
    """Stream `path` into `work_file` (one JSON array per line: index, line, raw record[, error]); returns the
    record count and the byte ranges of its chunks of CHUNK records."""
    chunks: list[tuple[int, int]] = []
    start = time.perf_counter()
    count = 0
    with open(work_file, "w", encoding="utf-8") as out:
        chunk_start = 0
        for index, item in enumerate(_read_llava_file(path)):
            if isinstance(item, DataError):
                row = [index, None, None, str(item)]
            else:
                row = [index, item[0], item[1]]
            out.write(json.dumps(row) + "\n")
            count = index + 1
            if count % CHUNK == 0:
                chunks.append((chunk_start, out.tell()))
                chunk_start = out.tell()
            if count % 100_000 == 0:
                logger.info("%s: read %d records (%.0f records/s)", path, count, count / (time.perf_counter() - start))
        if out.tell() > chunk_start:
            chunks.append((chunk_start, out.tell()))
    return count, chunks


def _error_row(index: int, err: DataError) -> dict:
    return {"index": index, "id": "", "image": None, "conversations": [], "qtype": "", "error": str(err),
            "reason": err.reason, "error_field": err.field, "error_id": err.record_id, "converted": None,
            "frames": None}


def _validate_chunks(chunks: list[tuple[int, int]], work_file: str, source: str, image_dir: str, image_mode: str,
                     stop_at_error: bool, total: int, absolute_paths: bool = False) -> Iterator[dict]:
    """One worker's share of the records: each validated into a prepared record, or an error row."""
    path, folder = Path(source), Path(image_dir)
    done, start, last_log = 0, time.perf_counter(), time.perf_counter()
    mine = len(chunks) * CHUNK
    with open(work_file, "rb") as f:
        for begin, end in chunks:
            f.seek(begin)
            while f.tell() < end:
                index, line, raw, *error = json.loads(f.readline())
                try:
                    if error:
                        raise DataError(error[0], path=source, index=index, field="<json>", reason="malformed_json")
                    record, converted, frames = _normalise_record(raw, _Ctx(path, index, line), folder, image_mode,
                                                                   absolute_paths)
                    yield {"index": index, **record, "error": None, "reason": None, "error_field": None,
                           "error_id": None, "converted": converted, "frames": frames}
                except DataError as err:
                    yield _error_row(index, err)
                    if stop_at_error:
                        return
                done += 1
                now = time.perf_counter()
                if now - last_log > 30:
                    rate = done / (now - start)
                    logger.info("%s: validated %d of this worker's ~%d records (of %d), %.0f records/s, ETA %.0f s",
                                source, done, mine, total, rate, max(0, mine - done) / rate)
                    last_log = now


_WORK_DIRS: list[str] = []


@atexit.register
def _remove_work_dirs() -> None:
    for work in _WORK_DIRS:
        shutil.rmtree(work, ignore_errors=True)


def import_llava_json(
    json_path: str | os.PathLike[str],
    image_dir: str | os.PathLike[str] | None = None,
    *,
    on_error: Literal["raise", "skip"] = "raise",
    image_mode: Literal["convert", "refuse"] = "convert",
    num_proc: int = 1,
    work_dir: str | os.PathLike[str] | None = None,
    absolute_paths: bool = False,
) -> tuple[datasets.Dataset, ImportReport]:
    """Validate and import a LLaVA-format dataset (JSON list, or .jsonl one record per line).

    ``image`` paths are relative to ``image_dir`` (default: the JSON file's folder) and may not leave it; absolute
    paths are refused unless ``absolute_paths`` (then taken as they are). Text-only
    records (no ``image``) are kept with image=None and must contain no ``<image>`` token. Images are decoded to
    check them and stored as their files' bytes; a non-RGB one is refused when ``image_mode='refuse'``. With
    ``on_error='skip'`` bad records are skipped, logged and counted per reason in the report; otherwise the first bad
    record (in file order) raises DataError. Raises DataError if no record is importable.

    The returned dataset is memory-mapped from Arrow files in ``work_dir`` (default: a temporary folder removed at
    exit), which must outlive it.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if image_mode not in ("convert", "refuse"):
        raise ValueError(f"image_mode must be 'convert' or 'refuse', got {image_mode!r}")
    path = Path(json_path)
    folder = Path(image_dir) if image_dir is not None else path.parent
    if work_dir is None:
        work_dir = tempfile.mkdtemp(prefix="vr-llava-")
        _WORK_DIRS.append(work_dir)
    work = Path(tempfile.mkdtemp(prefix="import-", dir=work_dir))
    report = ImportReport(source=str(path))
    start = time.perf_counter()
    total, chunks = _stage_records(path, work / "records.jsonl")
    logger.info("%s: %d records read in %.1f s; validating them in %d process(es)", path, total,
                time.perf_counter() - start, min(num_proc, max(1, len(chunks))))
    if total:
        staged = datasets.Dataset.from_generator(
            _validate_chunks, features=_WORK_FEATURES, cache_dir=str(work / "arrow"), keep_in_memory=False,
            num_proc=min(num_proc, len(chunks)) if num_proc > 1 and len(chunks) > 1 else None,
            gen_kwargs={"chunks": chunks, "work_file": str(work / "records.jsonl"), "source": str(path),
                        "image_dir": str(folder), "image_mode": image_mode, "stop_at_error": on_error == "raise",
                        "total": total, "absolute_paths": absolute_paths},
        )
    else:
        staged = datasets.Dataset.from_dict({k: [] for k in _WORK_FEATURES}, features=_WORK_FEATURES)
    status = staged.select_columns(list(_STATUS_FEATURES)).data.table
    errors = status.filter(status.column("error").is_valid())
    if errors.num_rows:
        rows = errors.sort_by("index").to_pylist()
        if on_error == "raise":
            first = rows[0]
            raise DataError(first["error"], path=str(path), index=first["index"], record_id=first["error_id"],
                            field=first["error_field"], reason=first["reason"])
        for row in rows:
            report.skipped[row["reason"]] = report.skipped.get(row["reason"], 0) + 1
            if len(report.messages) < ImportReport.MAX_MESSAGES:
                report.messages.append(row["error"])
                logger.warning("skipping LLaVA record: %s", row["error"])
    converted = status.column("converted").drop_null().value_counts().to_pylist()
    report.converted_modes = {c["values"]: int(c["counts"]) for c in converted}
    keep = status.column("error").is_null()
    report.animated = int(pyarrow.compute.sum(pyarrow.compute.greater(status.filter(keep).column("frames"), 1)).as_py() or 0)
    good = staged
    if errors.num_rows:
        good = staged.select([i for i, ok in enumerate(keep.to_pylist()) if ok])
    good = good.remove_columns(list(_STATUS_FEATURES))
    report.imported = len(good)
    report.seconds = time.perf_counter() - start
    if not report.imported:
        raise DataError(
            f"{path}: no valid records imported (skipped: {report.skipped})",
            path=str(path), field="<root>", reason="empty",
        )
    logger.info("imported %d records from %s in %.1f s (%.0f records/s), skipped %d %s, to be converted to RGB %s, "
                "animated (first frame used) %d", report.imported, path, report.seconds,
                total / max(report.seconds, 1e-9), report.num_skipped, report.skipped, report.converted_modes,
                report.animated)
    return good, report
