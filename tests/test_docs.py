"""The README is a landing page and the docs/ behind it hold together: every relative link resolves
(files and #anchors), the README stays short, its headline markers are where make readme-headline
writes, and its quick start runs on the default model."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
TOPICS = ["models-and-caches", "data", "api", "cli", "reproduction", "notebooks", "benchmarks",
          "architecture", "testing"]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def links(text: str) -> list[str]:
    """Markdown link targets outside code blocks and inline code."""
    text = _FENCE.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)
    return _LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        found.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    found |= set(re.findall(r'<a id="([^"]+)"', text))
    return found


def test_slugs_follow_githubs_rule():
    assert slug("How to read the committed reports") == "how-to-read-the-committed-reports"
    assert slug("ROME presets") == "rome-presets" and slug("API tour: `ku.x`") == "api-tour-kux"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in links(text):
        if re.match(r"^[a-z]+:", target):      # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_the_link_checker_sees_a_broken_link(tmp_path):
    # the check itself can fail: a missing file and a missing anchor are both caught
    (tmp_path / "a.md").write_text("# Title\n[x](b.md) [y](#nope) [z](#title) `[c](d.md)`\n")
    assert links((tmp_path / "a.md").read_text()) == ["b.md", "#nope", "#title"]
    assert anchors(tmp_path / "a.md") == {"title"}


def test_readme_is_a_landing_page():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines (> 150): move reference text to docs/"
    for topic in TOPICS:
        assert f"(docs/{topic}.md)" in text, f"the README's table of contents lacks docs/{topic}.md"
        assert (ROOT / "docs" / f"{topic}.md").is_file()
    assert re.search(r"!\[[^\]]*\]\(reports/[^)]+\.png\)", text), "no figure from a committed report"
    for command in ("make demo", "make test", "make lab", "LAB_ARGS="):
        assert command in text
    assert len(quick_start()) <= 8


def test_headline_markers_hold_what_make_readme_headline_writes(tmp_path):
    from kn_utils import reproduce
    from kn_utils.headline import readme_block

    text = README.read_text(encoding="utf-8")
    assert text.count(reproduce.README_START) == 1 and text.count(reproduce.README_END) == 1
    between = text.split(reproduce.README_START)[1].split(reproduce.README_END)[0].strip()
    assert between == readme_block(ROOT / "reports")      # regenerated: nothing changes
    copy = tmp_path / "README.md"
    copy.write_text(text)
    reproduce.update_readme(copy, ROOT / "reports")
    assert copy.read_text() == text and len(text.splitlines()) <= 150


def test_headline_short_form(tmp_path):
    from kn_utils.headline import readme_block

    for model, layer, value in (("a", 4, 10.0), ("b", 9, 20.5)):
        folder = tmp_path / model
        folder.mkdir()
        pd.DataFrame([
            {"result": "Table 1 ROME P36 reliability (token acc. %)", "ours": value, "ci_lo": 1.0,
             "ci_hi": 99.0, "n": 22, "paper": 99.79, "paper_setting": "GPT-2 XL"},
            {"result": f"AIE facts: MLP peak at last subject token (%, layer {layer})", "ours": 3.0,
             "ci_lo": float("nan"), "ci_hi": float("nan"), "n": 7, "paper": float("nan"),
             "paper_setting": float("nan")}]).to_csv(folder / "headline.csv", index=False)
        (folder / "REPORT.md").write_text("# r\n\n- scale: `report` (sizes: `{}`, some overridden)\n"
                                          "- commit: `0123456789abcdef`\n- total wall time: 5.0 s\n"
                                          + ("\n**Incomplete**: still to run: tracing\n" if model == "b" else ""))
    block = readme_block(tmp_path)
    assert "| Table 1 ROME P36 reliability (token acc. %) | 10.00 [1.00, 99.00] n=22 | " \
           "20.50 [1.00, 99.00] n=22 | 99.79 (GPT-2 XL) |" in block
    # the layer differs per model: one row, the layer in each cell
    assert "| AIE facts: MLP peak at last subject token (%) | 3.00 n=7, layer 4 | 3.00 n=7, layer 9 |  |" in block
    assert "commit `01234567`" in block and "total wall time: 5.0 s" in block
    assert "**b**" in block and block.count("**incomplete**") == 1
    assert readme_block(tmp_path / "none") == "(no report generated yet: `make reproduce`)"


def quick_start() -> list[str]:
    section = README.read_text(encoding="utf-8").split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return code.rstrip("\n").splitlines()


@pytest.mark.slow
def test_quick_start_runs_on_the_default_model(capsys):
    import kn_utils as ku

    code = "\n".join(quick_start())
    namespace = {}
    exec(compile(code, "README.md quick start", "exec"), namespace)   # noqa: S102
    out = capsys.readouterr().out.splitlines()
    suppressed = float(out[0])
    clean = ku.target_probability(namespace["lm"], "The capital of France is", "Paris")
    assert suppressed < clean / 2, (suppressed, clean)           # the top neurons matter
    assert "Rome" in out[1]                                      # the edit took
    assert ku.predict(namespace["lm"], "The capital of Canada is")[0][0] == " Ottawa"   # and was undone
