"""The docs (README.md, docs/*.md) stay true to the repository: their links resolve, the results they quote equal the
committed outputs they cite, and the commands, files and params they name exist.

A doc quotes a result in one of two ways, and both are checked against the committed reports/, metrics/ and bench/
files, so a re-run that moves a number fails here until the docs are updated:

- a number linked to a JSON key, `[0.953](metrics/summary.json#uniform25.visual_retention)`: the key path is dotted
  (list items by index) and the number must be the value rounded to as many decimals as it shows;
- a table whose caption (the last line of text above it) links a report under reports/ (`.md`): the table is a
  column selection of a table of that report (same header names) and each row equals, cell for cell, the report's row
  with the same first cell (`**` emphasis aside).

Reads files only (no project imports), so it takes well under a second.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")
NUMBER = re.compile(r"-?\d+(\.\d+)?")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# Paths in code spans that must exist: the repository's own folders (not output templates such as models/tuned/<run>).
SOURCE_FOLDERS = ("pipeline/", "stages/", "flows/", "tests/", "bench/", "params/", "configs/", "docs/", "reports/", ".ci/")


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans: where links are."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def code(text: str) -> list[str]:
    """The fenced code blocks and code spans of a doc: where commands and paths are."""
    return FENCE.findall(text) + CODE_SPAN.findall(FENCE.sub("", text))


def links(path: Path) -> list[tuple[str, str]]:
    """(text, target) of every relative link and image of a doc."""
    found = LINK.findall(prose(path.read_text()))
    return [(text, target) for text, target in found if not re.match(r"[a-z]+:|#", target)]


def resolve(doc: Path, target: str) -> Path:
    return (doc.parent / target.split("#", 1)[0]).resolve()


def json_value(source: Path, key_path: str):
    value = json.loads(source.read_text())
    for key in key_path.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key]
    return value


def tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(caption, header, rows) of every markdown table; the caption is the last line of text above the table."""
    found, lines = [], FENCE.sub("", text).splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"\|\s*:?-", lines[i + 1]):
            above = [line for line in lines[:i] if line.strip()]
            caption = above[-1] if above else ""
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(cells(lines[i]))
                i += 1
            found.append((caption, block[0], block[2:]))
        else:
            i += 1
    return found


def cells(line: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [part.strip().replace("**", "") for part in parts]


def anchors(markdown: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", markdown.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_relative_links_point_to_existing_files_and_sections(doc):
    missing = []
    for _, target in links(doc):
        path = resolve(doc, target)
        if not path.exists():
            missing.append(target)
        elif path.suffix == ".md" and "#" in target and target.split("#", 1)[1] not in anchors(path):
            missing.append(target)
    assert not missing, f"{doc_id(doc)}: links to missing files or sections: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_numbers_linked_to_a_json_key_equal_its_value(doc):
    wrong = []
    for text, target in links(doc):
        if ".json#" not in target:
            continue
        source, key_path = resolve(doc, target), target.split("#", 1)[1]
        assert NUMBER.fullmatch(text), f"{doc_id(doc)}: a link to a JSON key must show a number, got [{text}]({target})"
        decimals = len(text.split(".")[1]) if "." in text else 0
        try:
            value = json_value(source, key_path)
        except (KeyError, IndexError, ValueError) as err:
            wrong.append(f"[{text}]({target}): no key {key_path} ({err!r})")
            continue
        if f"{value:.{decimals}f}" != text:
            wrong.append(f"[{text}]({target}): the file says {value}")
    assert not wrong, f"{doc_id(doc)}: quoted numbers differ from their source:\n" + "\n".join(wrong)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_tables_citing_a_report_equal_it(doc):
    wrong = []
    for caption, header, rows in tables(doc.read_text()):
        reports = [t for _, t in LINK.findall(caption) if t.endswith(".md") and "reports/" in t and "://" not in t]
        if not reports:
            continue
        report = resolve(doc, reports[0])
        candidates = [(h, r) for _, h, r in tables(report.read_text()) if h[0] == header[0] and set(header) <= set(h)]
        if not candidates:
            wrong.append(f"no table of {reports[0]} has the columns {header}")
            continue
        for row in rows:
            match = [dict(zip(h, r)) for h, rs in candidates for r in rs if r[0] == row[0]]
            if not match:
                wrong.append(f"{reports[0]} has no row {row[0]!r} under the columns {header}")
                continue
            differing = {col: (ours, match[0][col]) for col, ours in zip(header, row) if ours != match[0][col]}
            if differing:
                wrong.append(f"{reports[0]}, row {row[0]!r}: (doc, report) {differing}")
    assert not wrong, f"{doc_id(doc)}: tables differ from the reports they cite:\n" + "\n".join(wrong)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_named_source_paths_and_modules_exist(doc):
    missing = []
    for snippet in code(doc.read_text()):
        for word in snippet.split():
            path = word.strip("`'\",;()").split("::")[0].rstrip(":")
            if path.startswith(SOURCE_FOLDERS) and not re.search(r"[<>*{}$]", path) and not (REPO / path).exists():
                missing.append(path)
        for module in re.findall(r"-m ((?:pipeline|stages|flows|bench|tests)(?:\.\w+)+)", snippet):
            base = REPO / module.replace(".", "/")
            if not (base.with_suffix(".py").exists() or (base / "__init__.py").exists()):
                missing.append(f"-m {module}")
    assert not missing, f"{doc_id(doc)}: names files or modules that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_make_targets_and_deployments_named_exist(doc):
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    deployments = {d["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    snippets = "\n".join(code(doc.read_text()))
    unknown_targets = set(re.findall(r"\bmake ([a-z][\w-]*)", snippets)) - targets
    unknown_deployments = set(re.findall(r"\bvisual-region-[a-z-]+/([a-z-]+)", snippets)) - deployments
    assert not unknown_targets, f"{doc_id(doc)}: no such Makefile target: {sorted(unknown_targets)}"
    assert not unknown_deployments, f"{doc_id(doc)}: no such deployment in prefect.yaml: {sorted(unknown_deployments)}"


def test_readme_names_the_ci_test_command():
    """CI (.ci/run) runs `make test`; the README shows the command that target runs."""
    assert "make test" in (REPO / ".ci" / "run").read_text()
    recipe = re.search(r"^test:.*\n\t(.+)$", (REPO / "Makefile").read_text(), re.M).group(1).strip()
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme and recipe in readme, f"README.md must show `make test` and its command `{recipe}`"


def test_readme_and_pipeline_doc_name_every_stage():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for doc in ("README.md", "docs/pipeline.md"):
        text = (REPO / doc).read_text()
        # named in a code span, or first on a line of a code block (the README's diagram)
        missing = [name for name in stages if not re.search(rf"`{name}(@[^`]*)?`|^{name}(@\S*)?\s", text, re.M)]
        assert not missing, f"{doc}: does not name the dvc.yaml stages {missing}"


def params_keys(values: dict, prefix: str = "") -> list[str]:
    """Dotted keys of params.yaml down to the leaves, except the user-named run entries and the shared `train`
    blocks, which the reference documents once (`tune.runs`, `<stage>.train`)."""
    keys = []
    for key, value in values.items():
        path = prefix + key
        if isinstance(value, dict) and path not in ("tune.runs", "tune.importance_runs") and key != "train":
            keys += params_keys(value, path + ".")
        else:
            keys.append(path)
    return keys


def test_params_reference_covers_params_yaml():
    reference = (REPO / "docs" / "pipeline.md").read_text()
    missing = [key for key in params_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
               if f"`{key}`" not in reference]
    assert not missing, f"docs/pipeline.md: the params reference lacks {missing}"
