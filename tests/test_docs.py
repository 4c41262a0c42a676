"""The documentation cannot rot: its Python examples run, its links resolve, the README stays a landing page.

- Every ```python block of README.md and docs/**/*.md runs, unless the line right before it is a skip marker with a
  reason: ``<!-- docs-test: skip (needs a GPU) -->``. The blocks of one page run in order in one namespace (a later
  block may use an earlier one's names), in a temporary working directory.
- Every relative link and image of those pages points to an existing file (and, for a Markdown page, an existing
  heading when it names one).
- README.md has at most 300 lines and keeps the test command block that .ci/run runs.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
README_MAX_LINES = 300

MARKER = re.compile(r"<!--\s*docs-test:(.*?)-->")
SKIP = re.compile(r"\s*skip\s*\((?P<reason>[^()]*)\)\s*")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first code line
    language: str
    code: str
    marker: str | None  # the text of a docs-test marker right before the fence, if any


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def scan(page: Path) -> tuple[list[Block], list[int]]:
    """The fenced blocks of a Markdown page, each with the docs-test marker on the line right before its fence, and
    the line numbers of markers outside any fence that sit before no fence."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, stray, i = [], [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            if MARKER.search(lines[i]) and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
                stray.append(i + 1)
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            j += 1
        blocks.append(Block(page, i + 2, opening["info"].lower(), "\n".join(body) + "\n",
                            marker[1] if marker else None))
        i = j + 1
    return blocks, stray


def code_blocks(page: Path) -> list[Block]:
    return scan(page)[0]


def skip_reason(block: Block) -> str | None:
    """The reason a block is skipped, or None when it runs. A marker that is not a skip with a reason raises."""
    if block.marker is None:
        return None
    found = SKIP.fullmatch(block.marker)
    if not found or not found["reason"].strip():
        raise ValueError(f"{_rel(block.page)}:{block.line - 1}: a docs-test marker must read "
                         f"'<!-- docs-test: skip (the reason) -->', got {block.marker.strip()!r}")
    return found["reason"].strip()


def python_blocks(page: Path) -> list[Block]:
    return [b for b in code_blocks(page) if b.language in ("python", "py")]


def _runnable_pages() -> list[Path]:
    pages = []
    for page in PAGES:
        blocks = python_blocks(page)
        if any(b.marker is None for b in blocks):
            pages.append(page)
    return pages


def test_every_skip_has_a_reason_and_sits_on_a_python_block():
    markers, problems = 0, []
    for page in PAGES:
        blocks, stray = scan(page)
        problems += [f"{_rel(page)}:{line}: a docs-test marker must sit right before a ```python fence"
                     for line in stray]
        for block in blocks:
            if block.marker is None:
                continue
            markers += 1
            if block.language not in ("python", "py"):
                problems.append(f"{_rel(page)}:{block.line - 1}: a docs-test marker on a {block.language} block")
            try:
                skip_reason(block)
            except ValueError as exc:
                problems.append(str(exc))
    assert not problems, "\n".join(problems)
    assert markers > 0  # the convention is in use (the GPU and hub examples)


@pytest.mark.parametrize("page", _runnable_pages(), ids=_rel)
def test_python_examples_run(page, tmp_path, monkeypatch):
    """The page's runnable blocks, in order, in one namespace, in a temporary working directory."""
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the examples' CPU branch: on a GPU machine the suite still runs Triton under the interpreter (conftest)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for block in python_blocks(page):
        if skip_reason(block) is not None:
            continue
        # blank lines in front keep tracebacks' line numbers those of the Markdown file
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        exec(code, namespace)


def _slug(heading: str) -> str:
    """A heading's anchor as mkdocs (toc's default slugify) and GitHub both make it for plain ASCII headings."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip()
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    anchors, inside = set(), None
    for line in page.read_text(encoding="utf-8").splitlines():
        fence = FENCE.match(line)
        if fence:
            inside = None if inside and line.strip().startswith(inside) else (inside or fence["fence"])
            continue
        if not inside and (heading := re.match(r"#{1,6}\s+(.*?)\s*#*$", line)):
            anchors.add(_slug(heading[1]))
    return anchors


def _links(page: Path) -> list[tuple[int, str]]:
    found, inside = [], None
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            inside = None if inside and line.strip().startswith(inside) else (inside or fence["fence"])
            continue
        if not inside:
            line = re.sub(r"`[^`]*`", "", line)  # code spans hold no links
            found.extend((number, m["target"]) for m in LINK.finditer(line))
    return found


def test_relative_links_point_to_existing_files():
    problems = []
    for page in PAGES:
        for number, target in _links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{_rel(page)}:{number}: {target}"
            if not resolved.exists():
                problems.append(f"{where}: no such file")
            elif not resolved.is_relative_to(ROOT):
                problems.append(f"{where}: outside the repository")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                problems.append(f"{where}: no heading #{anchor} in {_rel(resolved)}")
    assert not problems, "\n".join(problems)


def test_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: move the detail into docs/")
    # .ci/run runs the one ```bash block right after the marker
    markers = [i for i, line in enumerate(lines) if line.strip() == "<!-- test-command -->"]
    assert len(markers) == 1, "README.md needs exactly one <!-- test-command --> marker"
    after = lines[markers[0] + 1:]
    assert after and after[0].strip() == "```bash", "the test-command marker must be followed by a ```bash block"
    command = after[1:after.index("```", 1)]
    assert len(command) == 1 and "pytest" in command[0], command


def test_every_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [_rel(p) for p in PAGES if p.parent != ROOT
               and not re.search(rf"(^|\s){re.escape(p.relative_to(ROOT / 'docs').as_posix())}\s*$", nav, re.M)]
    assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"


def test_figures_are_the_committed_benchmark_plots():
    """docs/images holds copies of bench/results' plots (mkdocs serves only docs/): after a benchmark re-run, copy
    the new PNG over."""
    stale = [p.name for p in (ROOT / "docs" / "images").glob("*.png")
             if (ROOT / "bench" / "results" / p.name).exists()
             and p.read_bytes() != (ROOT / "bench" / "results" / p.name).read_bytes()]
    assert not stale, f"cp bench/results/{{{','.join(stale)}}} docs/images/"


def test_demo_families_agree_with_the_cli():
    """The pages name the demo's tiny pipelines as `vstar-kernels demo --help` lists them."""
    from vstar_kernels.demo import FAMILIES

    used = {(_rel(p), m[1]) for p in PAGES for m in re.finditer(r"--family[ =]([\w-]+)", p.read_text("utf-8"))}
    assert all(name in FAMILIES for _, name in used), sorted(used)
    listing = [line for line in (ROOT / "docs" / "getting-started.md").read_text("utf-8").splitlines()
               if line.startswith("`--family` picks")]
    assert len(listing) == 1 and set(re.findall(r"`([\w-]+)`", listing[0])) - {"--family"} == set(FAMILIES), listing
