"""The documentation checked against the repository.

* Every relative link of the pages (README.md, CONTRIBUTING.md, bench/README.md, docs/*.md), with its
  ``#anchor``, points to a file or folder of the repository and to a heading of the page it names.
* Every repository path the pages name in inline code or in a code block exists. A token counts as a path
  when its first component is an entry of the repository root or of the page's own folder (so
  ``bench/x.py``, ``setup.py``, or ``harness.py`` inside bench/README.md); ``path::test_name`` must name a
  test defined in that file. Skipped, as not paths of the repository: URLs, tokens with ``=``, templates and
  globs (any of ``< > * ? { } [ ] $ ~ |``, e.g. ``tests/ops/test_<op>.py``, ``runs/<timestamp>/``), and
  tokens whose first component is not in the repository (run-time outputs such as ``RUN_DIR/checkpoint.pt``,
  ``~/.cache/...``).
* Every citation ``docs/design.md §N`` (also ``§N, §M``, ``§N and §M``, ``§N–§M``) in any file names a
  numbered section of docs/design.md, and no file cites a document that is not in the repository.
* The README's quickstart, and the examples of docs/ops.md, run exactly as printed; each ``print(...)  # out``
  line prints ``out``.

Repository files are those git lists (tracked, or untracked and not ignored): what a checkout holds.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import io
import os
import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from tests.testing import require_extras

ROOT = Path(__file__).resolve().parents[2]
DESIGN = "docs/design.md"


@functools.cache
def repository_files() -> frozenset[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
    )
    if listed.returncode != 0:  # a copy without .git, as a GPU machine receives the checkout
        return files_not_ignored()
    return frozenset(path for path in listed.stdout.decode().split("\0") if path and (ROOT / path).is_file())


def files_not_ignored() -> frozenset[str]:
    """The files under ROOT that no .gitignore names (patterns relative to the .gitignore's folder)."""
    rules: list[tuple[str, str]] = []  # (folder relative to ROOT, pattern)
    files = set()
    for folder, subfolders, names in os.walk(ROOT):
        here = Path(folder).relative_to(ROOT).as_posix()
        if ".gitignore" in names:
            lines = (Path(folder) / ".gitignore").read_text().splitlines()
            rules.extend((here, line.strip().strip("/")) for line in lines if line.strip() and line[0] != "#")

        def ignored(name: str, here: str = here) -> bool:
            path = f"{here}/{name}".removeprefix("./")
            for base, pattern in rules:
                inside = path if base == "." else path.removeprefix(base + "/")
                if inside != path or base == ".":
                    if fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(inside, pattern):
                        return True
            return False

        subfolders[:] = [name for name in subfolders if name != ".git" and not ignored(name)]
        files |= {f"{here}/{name}".removeprefix("./") for name in names if not ignored(name)}
    return frozenset(files)


@functools.cache
def repository_folders() -> frozenset[str]:
    return frozenset(str(parent) for path in repository_files() for parent in PurePosixPath(path).parents)


def exists(path: str) -> bool:
    path = str(PurePosixPath(path))
    return path in repository_files() or path in repository_folders()


def entries_of(folder: str) -> set[str]:
    """The names directly inside ``folder`` ("." for the root) that hold repository files."""
    prefix = "" if folder == "." else folder + "/"
    return {path[len(prefix) :].split("/")[0] for path in repository_files() if path.startswith(prefix)}


PAGES = sorted(
    ["README.md", "CONTRIBUTING.md", "bench/README.md"]
    + [path for path in repository_files() if re.fullmatch(r"docs/[^/]+\.md", path)]
)


# ---------------------------------------------------------------------------------------------------------
# Reading Markdown: fenced code blocks, inline code, links, headings.

FENCE = re.compile(r"^(\s*)```(\w*)[^\n]*\n(.*?)^\1```[ \t]*$", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)


@functools.cache
def read(page: str) -> str:
    return (ROOT / page).read_text(encoding="utf-8")


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, first line number of the code)`` of every fenced block."""
    return [(m.group(2), m.group(3), text.count("\n", 0, m.start(3)) + 1) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The text outside fenced code blocks and HTML comments."""
    return HTML_COMMENT.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(page: str) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(read(page)).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return frozenset(out)


# ---------------------------------------------------------------------------------------------------------
# Links and paths.


def broken_links(page: str) -> list[str]:
    folder = PurePosixPath(page).parent
    text = INLINE_CODE.sub("", prose(read(page)))
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = page if not path else _normalised(folder / path)
        if resolved is None or not exists(resolved):
            problems.append(f"{page}: link {target!r}: no such file or folder in the repository")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            problems.append(f"{page}: link {target!r}: {resolved} has no heading with anchor #{anchor}")
    return problems


def _normalised(path: PurePosixPath) -> str | None:
    """``path`` with ``..`` resolved, relative to the root; None when it leaves the repository."""
    parts: list[str] = []
    for part in path.parts:
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts) or "."


TEMPLATE_OR_GLOB = re.compile(r"[<>*?{}\[\]$~|=]|://")


def path_candidates(page: str) -> list[str]:
    """Whitespace-separated tokens of the page's inline code and code blocks, without surrounding quotes,
    brackets and punctuation."""
    text = read(page)
    pieces = [code for _, code, _ in code_blocks(text)]
    pieces += [m.group(2) for m in INLINE_CODE.finditer(prose(text))]
    tokens = []
    for piece in pieces:
        for token in piece.split():
            token = token.strip("'\"(),;:").rstrip(".")
            if token:
                tokens.append(token)
    return tokens


def missing_paths(page: str) -> list[str]:
    folder = str(PurePosixPath(page).parent)
    problems = []
    for token in sorted(set(path_candidates(page))):
        if TEMPLATE_OR_GLOB.search(token.split("::")[0]):
            continue
        path, _, test_name = token.partition("::")
        if test_name and not path.endswith(".py"):
            continue  # an op name such as symkernels::sinkhorn
        path = path.rstrip("/")
        first = path.split("/")[0]
        if first in entries_of("."):
            resolved = path
        elif folder != "." and first in entries_of(folder):
            resolved = f"{folder}/{path}"
        else:
            continue  # not a path of the repository (a run-time output, a name, a word)
        if not exists(resolved):
            problems.append(f"{page}: `{token}`: {resolved} is not in the repository")
        elif test_name and not re.search(
            rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(test_name)}\b", read(resolved), re.MULTILINE
        ):
            problems.append(f"{page}: `{token}`: {resolved} defines no {test_name}")
    return problems


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_into_the_repository(page):
    assert not broken_links(page), "\n".join(broken_links(page))


@pytest.mark.parametrize("page", PAGES)
def test_named_repository_paths_exist(page):
    assert not missing_paths(page), "\n".join(missing_paths(page))


def test_the_checks_find_what_is_missing(tmp_path, monkeypatch):
    # The two checks above on a page with one good and one bad entry of each kind.
    page = "docs/_docs_check_probe.md"
    text = (
        "# Probe\n\n[ok](design.md#1-the-idea) [bad](nowhere.md) [bad anchor](design.md#no-such-section)\n\n"
        "`symkernels/ops/sinkhorn.py` `symkernels/ops/missing.py` `runs/<timestamp>/`\n"
        "`RUN_DIR/checkpoint.pt` `tests/ops/test_sinkhorn.py::test_gpu_parity_matrix`\n"
        "`tests/ops/test_sinkhorn.py::test_nothing_here`\n"
    )
    original = read
    monkeypatch.setattr(f"{__name__}.read", lambda p: text if p == page else original(p))
    links = broken_links(page)
    assert len(links) == 2 and "nowhere.md" in links[0] and "no-such-section" in links[1], links
    paths = missing_paths(page)
    assert len(paths) == 2, paths
    assert "symkernels/ops/missing.py" in paths[0] and "test_nothing_here" in paths[1], paths


# ---------------------------------------------------------------------------------------------------------
# Citations.

CITATION = re.compile(r"design\.md\s*(§\s*\d+(?:\s*(?:,|and|or|–|-|to)\s*§?\s*\d+)*)")
# Documents that are not in the repository: the background notes the design was written from, and the
# folder that held them. Spelled in pieces, so that this file does not cite them itself.
OUTSIDE = [
    re.compile(r"\b(?:method|kernels|conventions)" + r"\.md\b"),
    re.compile(r"\b(?:method|kernels)" + r"\s+§\s*\d"),
    re.compile(r"layerwise" + r"\.md\s*§"),
    re.compile(r"\.\./" + r"shared\b|/work/" + r"shared\b|\bshared/" + r"spec\b"),
]
# The page docs/layerwise.md is in the repository: named with its folder, or by its name next to it in docs/.
BARE_LAYERWISE_PAGE = re.compile(r"(?<![\w/.-])layerwise" + r"\.md\b")


def design_sections() -> list[int]:
    return [int(n) for n in re.findall(r"^## (\d+)\. ", prose(read(DESIGN)), re.MULTILINE)]


def text_files() -> list[tuple[str, str]]:
    out = []
    for path in sorted(repository_files()):
        try:
            out.append((path, (ROOT / path).read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue  # images, compiled files
    return out


def citation_problems() -> list[str]:
    sections = set(design_sections())
    problems = []
    for path, text in text_files():
        for match in CITATION.finditer(text):
            for number in map(int, re.findall(r"\d+", match.group(1))):
                if number not in sections:
                    line = text.count("\n", 0, match.start()) + 1
                    problems.append(f"{path}:{line}: cites {DESIGN} §{number}, which has no such section")
    return problems


def outside_citations() -> list[str]:
    problems = []
    for path, text in text_files():
        patterns = OUTSIDE if path.startswith("docs/") else [*OUTSIDE, BARE_LAYERWISE_PAGE]
        for pattern in patterns:
            for match in pattern.finditer(text):
                line_number = text.count("\n", 0, match.start()) + 1
                line = text.splitlines()[line_number - 1].strip()
                problems.append(f"{path}:{line_number}: {line[:120]}")
    return problems


def test_design_sections_are_numbered_in_order():
    sections = design_sections()
    assert sections == list(range(1, len(sections) + 1)), sections
    assert len(sections) >= 15, sections


def test_design_citations_name_existing_sections():
    problems = citation_problems()
    assert not problems, "\n".join(problems)


def test_nothing_cites_a_document_outside_the_repository():
    problems = outside_citations()
    assert not problems, (
        f"{len(problems)} citations of documents that are not in the repository (cite {DESIGN} §N):\n"
        + "\n".join(problems)
    )


def test_citation_checks_find_bad_citations():
    # The names are split so that this file does not cite them.
    text = f"see {DESIGN} §2, §13 and §99; " + "method" + ".md §4; " + "kernels" + " §3; ../" + "shared" + "/"
    text += "spec; docs/layerwise.md"
    numbers = [re.findall(r"\d+", m.group(1)) for m in CITATION.finditer(text)]
    assert numbers == [["2", "13", "99"]]
    assert 99 not in design_sections() and {2, 13} <= set(design_sections())
    found = [m.group(0) for pattern in OUTSIDE for m in pattern.finditer(text)]
    assert len(found) == 3, found
    assert not BARE_LAYERWISE_PAGE.search("docs/layerwise.md")
    assert BARE_LAYERWISE_PAGE.search("see layerwise" + ".md")


# ---------------------------------------------------------------------------------------------------------
# Examples that run.


def section(text: str, heading: str) -> str:
    """The text of the ``## heading`` section, up to the next heading of level 1 or 2 outside code blocks."""
    lines = text.splitlines(keepends=True)
    fenced = False
    start = None
    for index, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,2} ", line):
            if start is not None:
                return "".join(lines[start:index])
            if line.strip() == f"## {heading}":
                start = index + 1
    assert start is not None, f"no section '## {heading}'"
    return "".join(lines[start:])


# ``print(...)  # what it prints``
PRINT_WITH_OUTPUT = re.compile(r"^[ \t]*print\(.*?\)[ \t]+#[ \t]*(.+?)[ \t]*$", re.MULTILINE)


def run_python_blocks(page: str, *headings: str) -> None:
    """Runs the page's python blocks (those under the ``## `` headings given, in order, else all of them) in
    one namespace, and checks that each ``print(...)  # output`` printed its output."""
    text = read(page)
    bodies = [section(text, heading) for heading in headings] or [text]
    blocks = []
    for body in bodies:
        first_line = text.count("\n", 0, text.index(body))
        python = [(code, line) for language, code, line in code_blocks(body) if language == "python"]
        blocks += [(code, first_line + line) for code, line in python]
    assert blocks, f"{page} has no python block" + (f" under {headings}" if headings else "")
    expected = []
    for code, _ in blocks:
        expected += PRINT_WITH_OUTPUT.findall(code)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for code, line in blocks:
            # Padded so that a traceback names the page's own line numbers.
            exec(compile("\n" * (line - 1) + code, page, "exec"), namespace)
    assert printed.getvalue().splitlines() == expected


def test_readme_quickstart_runs_as_printed():
    # The tiny-matrix example under "Ops and backends" continues the quickstart's imports.
    run_python_blocks("README.md", "Quickstart", "Ops and backends")


def test_ops_page_examples_run_as_printed():
    require_extras("train")  # symkernels.analysis needs SciPy
    run_python_blocks("docs/ops.md")


def test_readme_names_the_commands_ci_runs():
    setup = [code for language, code, _ in code_blocks(read("README.md")) if language == "bash"][0]
    assert [line.split("#")[0].strip() for line in setup.splitlines()] == [
        "bash scripts/train.sh",
        "bash scripts/test.sh",
    ]
    assert "bash scripts/test.sh" in (ROOT / ".ci/run").read_text().splitlines()
