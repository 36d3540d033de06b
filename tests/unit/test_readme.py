"""pipeline/readme.py: the README's study section is the committed study report's, and the generator copies what the
report says (columns by name, every claim line) and refuses a report or README it cannot read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline import readme

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_study_section_is_the_committed_reports():
    text = (REPO / "README.md").read_text()
    assert readme.BEGIN in text, "the README has no generated study section"
    block = readme.BEGIN + text.split(readme.BEGIN, 1)[1].split(readme.END, 1)[0] + readme.END
    assert block == readme.study_section(REPO / "reports/study"), "README out of date with reports/study: `make readme`"


def test_the_section_copies_the_reports_selections_and_claims():
    block = readme.study_section(REPO / "reports/study-depth", "reports/study-depth")
    report = (REPO / "reports/study-depth/summary.md").read_text()
    claims = [line for line in report.splitlines() if line.startswith(("- holds", "- fails", "- within noise"))]
    assert claims and all(line in block.splitlines() for line in claims)
    # the uniform25 row keeps its seeds, interval and pruned retention (columns picked by name, not position)
    assert "| uniform25 | 3 | 0.988 [0.975, 0.997] | 1.002 [0.987, 1.017] | 0.414 | 0.858 |" in block
    assert "[reports/study-depth/summary.md](reports/study-depth/summary.md)" in block


def test_make_readme_rewrites_only_the_block(tmp_path):
    report_dir = tmp_path / "reports/study"
    shutil.copytree(REPO / "reports/study-depth", report_dir, ignore=shutil.ignore_patterns("*.png"))
    page = tmp_path / "README.md"
    page.write_text(f"# title\n\nbefore\n\n{readme.BEGIN}\nstale\n{readme.END}\n\nafter\n")
    readme.main([str(page), str(report_dir)])
    text = page.read_text()
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "stale" not in text
    assert readme.study_section(report_dir) in text
    readme.main([str(page), str(report_dir)])  # idempotent
    assert page.read_text() == text


def test_bad_readme_or_report_is_refused(tmp_path):
    with pytest.raises(ValueError, match="markers once each"):
        readme.replace_block("no markers here", "block")
    with pytest.raises(ValueError, match="markers once each"):
        readme.replace_block(f"{readme.END}\n{readme.BEGIN}", "block")
    (tmp_path / "summary.md").write_text("# Layer-selection report\n\n## Accuracy per question type\n")
    with pytest.raises(ValueError, match="no section '## Selections over training seeds'"):
        readme.study_section(tmp_path)
    with pytest.raises(ValueError, match=r"no column\(s\) \['seeds'"):
        readme.select_columns(["| selection | visual |", "|---|---|", "| all | 0.9 |"], ("selection", "seeds"))
