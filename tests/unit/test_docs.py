"""The README stays an entrance, and no link in the docs leads nowhere.

Links are checked the way GitHub renders them: a relative path must name a file
of the repository, and a #fragment a heading of the target, by GitHub's anchor
rules (lower case, spaces become '-', punctuation other than '-' and '_'
dropped, repeated headings numbered -1, -2, ...).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 200
JOB_PAGES = ("training", "serving", "lambda", "aws", "distributed", "capacity", "development", "benchmarks")

FENCE = re.compile(r"^ {0,3}(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); the target ends at whitespace or ')'.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_'
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in _prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code."""
    found = []
    for number, line in _prose_lines(path):
        prose = INLINE_CODE.sub("", line)
        found.extend((number, match.group(1)) for match in LINK.finditer(prose))
    return found


def _documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _job_table_pages() -> list[str]:
    """Link targets in the rows of the README's table under '## Jobs'."""
    targets, in_jobs = [], False
    for _, line in _prose_lines(README):
        heading = HEADING.match(line)
        if heading:
            in_jobs = heading.group(2).strip().lower() == "jobs"
            continue
        if in_jobs and line.lstrip().startswith("|"):
            targets.extend(match.group(1) for match in LINK.finditer(INLINE_CODE.sub("", line)))
    return targets


def test_readme_is_an_entrance_of_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; keep it to {README_MAX_LINES}: move the manual to docs/<job>.md")


@pytest.mark.parametrize("document", _documents(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(document: Path):
    broken = []
    for number, target in links(document):
        if SCHEME.match(target):
            continue  # https:, mailto: ...: not ours to check offline
        path_part, _, fragment = target.partition("#")
        destination = (document.parent / path_part).resolve() if path_part else document
        where = f"{document.relative_to(ROOT)}:{number}: {target}"
        if not destination.exists():
            broken.append(f"{where}: no such file")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{where}: no heading with anchor #{fragment} in {destination.name}")
    assert not broken, "\n".join(broken)


def test_the_job_table_lists_every_job_page_and_each_exists():
    listed = _job_table_pages()
    missing = [target for target in listed if not (ROOT / target.partition("#")[0]).is_file()]
    assert not missing, f"the README's job table links pages that do not exist: {missing}"
    expected = {f"docs/{name}.md" for name in JOB_PAGES}
    assert expected <= set(listed), f"the README's job table lacks {sorted(expected - set(listed))}"


def test_every_docs_page_is_reachable_from_the_readme():
    listed = {target.partition("#")[0] for target in _job_table_pages()}
    orphans = [f"docs/{page.name}" for page in sorted(DOCS.glob("*.md")) if f"docs/{page.name}" not in listed]
    assert not orphans, f"pages no README job row links to: {orphans}"


@pytest.mark.parametrize("heading, slug", [
    ("Checkpoints, stop and resume", "checkpoints-stop-and-resume"),
    ("Data: channels", "data-channels"),
    ("What make loadtest does", "what-make-loadtest-does"),
    ("Where the served time goes (Server-Timing)", "where-the-served-time-goes-server-timing"),
    ("The `kennel_serve` package", "the-kennel_serve-package"),
    ("Sustained load on a shared host: slow spells", "sustained-load-on-a-shared-host-slow-spells"),
])
def test_anchors_follow_githubs_rules(heading, slug):
    assert github_slug(heading) == slug
