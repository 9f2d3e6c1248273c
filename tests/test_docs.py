"""The documentation holds together: README.md stays short (at most 15,000 bytes) and points
into docs/, one page a topic; docs/README.md indexes every page; and every relative link in
README.md and docs/*.md resolves — the file exists and, for a ``#fragment`` into a Markdown
file, that file has a heading with that GitHub slug. Links inside code (fenced blocks and
inline code spans) are not links and are not checked."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 15_000
TOPIC_PAGES = (
    "README.md",  # the index of the pages
    "fleet.md",
    "http.md",
    "grpc.md",
    "routing.md",
    "admission.md",
    "fairshare.md",
    "batching.md",
    "capacity.md",
    "tracing.md",
    "scaling.md",
    "operations.md",
    "security.md",
    "architecture.md",
    "benchmarks.md",
    "configuration.md",
)

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# A code span: a run of N backticks, anything (across a line break too), the same run again.
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)[\s\S]*?(?<!`)\1(?!`)")
# [text](target "title") and ![alt](target); the text may hold one level of brackets and
# may wrap onto the next line.
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """``text`` with fenced code blocks blanked out (line numbers kept) and code spans
    removed: what is left is where Markdown links can be."""
    lines: list[str] = []
    fence: str | None = None
    for line in text.split("\n"):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
            lines.append("")
        elif fence is not None:
            stripped = line.strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                fence = None
            lines.append("")
        else:
            lines.append(line)
    return CODE_SPAN.sub("", "\n".join(lines))


def link_targets(text: str) -> list[str]:
    """Every link target in the Markdown ``text`` (inline links, images, reference
    definitions), outside code."""
    body = prose(text)
    found = [m.group(1) for m in INLINE_LINK.finditer(body)]
    found += [m.group(1) for m in REFERENCE_DEFINITION.finditer(body)]
    return [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in found]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links and code spans reduced to their
    text, HTML tags dropped) lower-cased, punctuation removed, each space a hyphen."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The fragments a link into ``path`` may name: its headings' slugs (a repeated slug
    gets -1, -2, … as on GitHub) and explicit HTML anchors."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    fence: str | None = None
    for line in path.read_text().split("\n"):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
            continue
        if fence is not None:
            stripped = line.strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                fence = None
            continue
        heading = HEADING.match(line)
        if heading:
            slug = github_slug(heading.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
        found.update(m.group(1) for m in HTML_ANCHOR.finditer(line))
    return found


def broken_links(path: Path) -> list[str]:
    """Each relative link in ``path`` that does not resolve, with the reason."""
    problems: list[str] = []
    for target in link_targets(path.read_text()):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # an absolute URL: not this test's business
        file_part, _, fragment = target.partition("#")
        file_part = unquote(file_part)
        if not file_part:
            resolved = path
        elif file_part.startswith("/"):
            resolved = ROOT / file_part.lstrip("/")
        else:
            resolved = (path.parent / file_part).resolve()
        if not resolved.exists():
            problems.append(f"{target}: no such file {resolved}")
            continue
        if ROOT not in (resolved, *resolved.parents):
            problems.append(f"{target}: outside the repository")
            continue
        markdown = resolved.is_file() and resolved.suffix == ".md"
        if fragment and markdown and unquote(fragment) not in anchors(resolved):
            problems.append(f"{target}: no heading with slug #{fragment} in "
                            f"{resolved.relative_to(ROOT)}")
    return problems


def test_readme_is_at_most_15000_bytes() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (at most {README_MAX_BYTES}): move detail into docs/")


@pytest.mark.parametrize("page", TOPIC_PAGES)
def test_docs_has_each_topic_page(page: str) -> None:
    assert (DOCS / page).is_file(), f"docs/{page} is missing"


def test_the_docs_index_links_every_page() -> None:
    index = DOCS / "README.md"
    linked = {(index.parent / unquote(t.partition("#")[0])).resolve()
              for t in link_targets(index.read_text()) if not SCHEME.match(t)}
    unlisted = sorted(p.name for p in DOCS.glob("*.md")
                      if p != index and p.resolve() not in linked)
    assert not unlisted, f"docs/README.md does not link {unlisted}"


def test_the_readme_links_every_topic_page() -> None:
    linked = {(README.parent / unquote(t.partition("#")[0])).resolve()
              for t in link_targets(README.read_text()) if not SCHEME.match(t)}
    missing = sorted(p for p in TOPIC_PAGES if (DOCS / p).resolve() not in linked)
    assert not missing, f"README.md does not link docs/{missing}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_the_checker_itself() -> None:
    """Slugs as GitHub makes them; links in code are not links; link text may wrap."""
    assert github_slug("gRPC (`tritonclient.grpc`, streaming, decoupled models)") == \
        "grpc-tritonclientgrpc-streaming-decoupled-models"
    assert github_slug("Routing: one slow worker of three") == "routing-one-slow-worker-of-three"
    assert github_slug("Endpoints, as the gateway answers them") == \
        "endpoints-as-the-gateway-answers-them"
    assert github_slug("Admission — and herds") == "admission--and-herds"
    assert github_slug("See [the docs](docs/README.md) now") == "see-the-docs-now"
    text = ("a [wrapped\nlink](a.md#x) and `[code](b.md)`, ``[more `code`](c.md)``\n"
            "```\n[fenced](d.md)\n```\n![img](e.png \"t\") [ref]: f.md\n"
            "[def]: <g h.md>\n")
    assert link_targets(text) == ["a.md#x", "e.png", "g h.md"]
