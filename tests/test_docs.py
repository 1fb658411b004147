"""The documentation: the site builds in strict mode, the README stays a front door, and no page
reads like a development log (issues, sessions, waves, commit hashes, before/after runs).

docs/notes/ holds staging text that is folded into the pages later: it is not part of the site
(mkdocs.yml's exclude_docs) and not checked here.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from support import REPO

README = REPO / "README.md"
README_MAX_LINES = 250


def _pages():
    yield README
    for p in sorted((REPO / "docs").rglob("*.md")):
        if "notes" not in p.relative_to(REPO / "docs").parts:
            yield p


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


# What a development log says and a product page does not.
LOG_PATTERNS = {
    "an issue number": re.compile(r"\bissues? #?[0-9]+", re.I),
    "a wave of work": re.compile(r"\b(this|that|the|a|next|last|previous) wave\b"
                                 r"|\bmerged[- ]wave\b", re.I),
    "a work session": re.compile(r"\b(this|same|a later|an earlier|later|earlier|previous)"
                                 r" session\b|\bin one session\b", re.I),
    "a before/after comparison": re.compile(r"\bbefore = |\bafter = this\b|\bthis branch\b", re.I),
    # 7 to 40 hex digits with at least one digit and one letter: an abbreviated commit hash.
    "a commit hash": re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"),
}


@pytest.mark.parametrize("page", list(_pages()), ids=lambda p: str(p.relative_to(REPO)))
def test_no_development_log(page):
    prose = _prose(page.read_text())
    found = [f"{what}: {m.group(0)!r}" for what, rx in LOG_PATTERNS.items()
             for m in rx.finditer(prose)]
    assert not found, f"{page.relative_to(REPO)} reads like a development log: {found}"


def test_log_patterns_catch_what_they_are_for():
    log = ("Measured in issue 16 during this wave, before = bf2e00c, after = this branch; "
           "a later session found 95d8b8f slower, alternated in one session.")
    hits = {what for what, rx in LOG_PATTERNS.items() if rx.search(log)}
    assert hits == set(LOG_PATTERNS)
    product = ("Each client keeps one session; its session ends when the stream breaks. "
               "1000000 blocks, xxh3-64, 0xdeadbeef, SHA-256.")
    assert not [what for what, rx in LOG_PATTERNS.items() if rx.search(_prose(product))]


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    headings = [line for line in lines if line.startswith("## ")]
    for needed in ("## Not yet run on a GPU", "## Run it", "## Use the SDK", "## Test it",
                   "## Headline results", "## Documentation"):
        assert needed in headings, f"README.md lacks {needed!r}"
    # The GPU caveat comes before any instruction.
    assert headings.index("## Not yet run on a GPU") < headings.index("## Run it")


def test_readme_links_resolve():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        assert (REPO / target).exists(), f"README.md links to missing {target}"


def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: a missing page, a broken link or anchor, or a page left out of
    the nav fails. mkdocs comes with the test extra (through the docs extra)."""
    try:
        import mkdocs  # noqa: F401
        import material  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"{exc}: pip install -e '.[docs]' (the test extra includes it)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                        str(tmp_path / "site")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "integrations" / "vllm" / "index.html").exists()
    assert not (tmp_path / "site" / "notes").exists()
