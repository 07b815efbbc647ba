"""The documentation holds together: every local link and image in the repository's
Markdown files points at a file that exists, every #anchor into a Markdown file names one
of its headings, and the README stays a front page."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250

# [text](target) and ![alt](target), the target up to whitespace or ')', an optional
# "title" after it. Link text may hold one level of brackets (`[a [b] c](x)`).
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"  # [text] or ![alt]
    r"\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)"  # (target "title")
)
# [label]: target (reference definitions)
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def markdown_files() -> list[Path]:
    """README.md, docs/**/*.md, slurm/README.md and every other tracked *.md (not .venv*)."""
    found = {ROOT / "README.md", ROOT / "slurm" / "README.md", *(ROOT / "docs").rglob("*.md")}
    try:
        tracked = subprocess.run(["git", "ls-files", "-z", "--", "*.md"], cwd=ROOT,
                                 capture_output=True, check=True).stdout.decode()
        found.update(ROOT / name for name in tracked.split("\0") if name)
    except (OSError, subprocess.CalledProcessError):
        pass  # not a git checkout (an sdist): the fixed set above
    return sorted(p for p in found
                  if p.is_file() and not p.relative_to(ROOT).parts[0].startswith(".venv"))


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code removed."""
    out, fenced = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fenced is None:
                fenced = m.group(1)
            elif m.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            out.append((number, INLINE_CODE.sub("", line)))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image in a Markdown file."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        found += [(number, m.group(1)) for m in INLINE_LINK.finditer(line)]
        found += [(number, m.group(1)) for m in REFERENCE_DEF.finditer(line)]
    return found


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation but '-' and
    '_' removed, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, repeated ones numbered as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8").replace("\r", "")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def test_slugs_follow_githubs_rule():
    assert github_slug("ES against GRPO (TRL)") == "es-against-grpo-trl"
    assert github_slug("Speed: lowrank mode and the benchmark") == \
        "speed-lowrank-mode-and-the-benchmark"
    assert github_slug("On a workstation: `make`") == "on-a-workstation-make"
    assert github_slug("What has run on a GPU") == "what-has-run-on-a-gpu"
    assert github_slug("a_b - c.d") == "a_b---cd"


def test_links_are_found_outside_code_only(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See [a](a.md#x) and ![b](img/b.png \"title\") and `[c](c.md)`.\n"
                    "```\n[d](d.md)\n```\n[e]: e.md\n[f [g]](f.md)\n")
    assert [t for _, t in links(page)] == ["a.md#x", "img/b.png", "e.md", "f.md"]


FILES = markdown_files()


def test_the_markdown_files_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    assert {"README.md", "slurm/README.md", "docs/results.md"} <= names


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per link or image of a Markdown file whose file (or heading) is missing."""
    broken = []
    for number, target in links(path):
        if not target or EXTERNAL.match(target):
            continue  # http(s):, mailto:, ...
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not dest.exists():
            broken.append(f"{where}: no such file")
        elif (anchor and dest.suffix.lower() == ".md"
              and unquote(anchor).lower() not in anchors(dest)):
            broken.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return broken


def test_missing_files_and_headings_are_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Title\n\n## Some: section (x)\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](docs/b.md#some-section-x) [ok](docs/b.md) [self](#top)\n"
                    "[bad](docs/b.md#nowhere) ![gone](img/none.png) [web](https://x.org/y)\n"
                    "# Top\n")
    assert broken_links(page, tmp_path) == [
        "a.md:2: docs/b.md#nowhere: no heading with anchor #nowhere in b.md",
        "a.md:2: img/none.png: no such file",
    ]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_local_link_and_image_exists(path):
    broken = broken_links(path)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move detail to docs/")
