"""The docs cannot drift from the tree.

* docs/layout.md names every module under the package folders, and every module it names exists;
* the README's map of docs/ links only pages that exist, and every docs/*.md is in the map;
* every ``make <target>`` and ``python -m <module>`` in a code span of README.md or docs/*.md
  is a Makefile target / an importable module spec.

Other engineers add modules in parallel, so each failure message lists exactly the missing and
extra names: whoever merges fixes the page from the message.
"""

from __future__ import annotations

import importlib.util
import re

from tests.conftest import REPO

PACKAGE_FOLDERS = ["medmetric", "lightning_modules", "datamodules", "callbacks", "experiments"]
DOCS = REPO / "docs"
LAYOUT = DOCS / "layout.md"
README = REPO / "README.md"

_PY_PATH = re.compile(r"`((?:[A-Za-z0-9_.-]+/)+[A-Za-z0-9_.-]+\.py)`")  # a path with a folder
_DOC_LINK = re.compile(r"\]\((docs/[A-Za-z0-9_./-]+\.md)\)")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`\n]+)`")
_MAKE = re.compile(r"(?<![\w./-])make\s+([A-Za-z0-9][A-Za-z0-9_-]*)(?![\w=])")
_PYTHON_M = re.compile(r"(?:\bpython3?|\btorchrun\b[^\n]*?)\s+-m\s+([A-Za-z_][\w.]*)")


def tree_modules() -> set[str]:
    """Repository-relative paths of every module under the package folders (``__init__`` aside)."""
    return {
        path.relative_to(REPO).as_posix()
        for folder in PACKAGE_FOLDERS
        for path in (REPO / folder).rglob("*.py")
        if path.name != "__init__.py" and ".venv" not in path.parts
    }


def layout_modules(text: str) -> set[str]:
    return set(_PY_PATH.findall(text))


def layout_problems(text: str, tree: set[str], exists=lambda p: (REPO / p).is_file()) -> list[str]:
    named = layout_modules(text)
    missing = sorted(tree - named)
    extra = sorted(p for p in named if not exists(p))
    problems = []
    if missing:
        problems.append("modules in the tree that docs/layout.md does not name (add a row each):\n  "
                        + "\n  ".join(missing))
    if extra:
        problems.append("modules docs/layout.md names that do not exist (remove or rename each):\n  "
                        + "\n  ".join(extra))
    return problems


def test_layout_page_names_every_module_and_only_existing_ones():
    problems = layout_problems(LAYOUT.read_text(), tree_modules())
    assert not problems, "\n".join(problems)


def test_layout_check_sees_a_fake_module():
    """Break it on purpose: a named module that is not in the tree, and a tree module left out."""
    tree = {"datamodules/skin.py", "datamodules/brand_new.py"}
    text = "| `datamodules/skin.py` | ok |\n| `lightning_modules/no_such_module.py` | fake |\n"
    problems = layout_problems(text, tree, exists=lambda p: p in tree)
    assert problems == [
        "modules in the tree that docs/layout.md does not name (add a row each):\n  datamodules/brand_new.py",
        "modules docs/layout.md names that do not exist (remove or rename each):\n  lightning_modules/no_such_module.py",
    ]


def test_readme_map_and_docs_folder_agree():
    linked = set(_DOC_LINK.findall(README.read_text()))
    pages = {p.relative_to(REPO).as_posix() for p in DOCS.glob("*.md")}
    dead = sorted(linked - pages)
    unmapped = sorted(pages - linked)
    assert not dead and not unmapped, (
        f"README links to docs pages that do not exist: {dead}\n"
        f"docs pages missing from the README's map: {unmapped}"
    )


def code_spans(text: str) -> list[str]:
    """Fenced blocks (backslash continuations joined) and inline code spans."""
    fenced = [block.replace("\\\n", " ") for block in _FENCE.findall(text)]
    rest = _FENCE.sub("", text)
    return fenced + _INLINE.findall(rest)


def makefile_targets() -> set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_. -]+?):(?!=)", line)
        if match and not line.startswith(("\t", "#")):
            targets |= set(match.group(1).split())
    return targets


def documented_commands() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``{target: {files}}`` for ``make`` and ``{module: {files}}`` for ``python -m``."""
    makes: dict[str, set[str]] = {}
    modules: dict[str, set[str]] = {}
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        name = page.relative_to(REPO).as_posix()
        for span in code_spans(page.read_text()):
            for target in _MAKE.findall(span):
                makes.setdefault(target, set()).add(name)
            for module in _PYTHON_M.findall(span):
                modules.setdefault(module.rstrip("."), set()).add(name)
    return makes, modules


def test_documented_make_targets_exist():
    makes, _ = documented_commands()
    assert makes, "no `make <target>` found in README/docs: is the pattern right?"
    unknown = {t: sorted(files) for t, files in makes.items() if t not in makefile_targets()}
    assert not unknown, f"make targets named in the docs that the Makefile lacks: {unknown}"


def test_documented_python_modules_exist():
    _, modules = documented_commands()
    assert modules, "no `python -m <module>` found in README/docs: is the pattern right?"

    def importable(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            return False

    unknown = {m: sorted(files) for m, files in modules.items() if not importable(m)}
    assert not unknown, f"`python -m` modules named in the docs that do not import: {unknown}"


def test_command_check_sees_a_fake_command():
    text = "```bash\nmake no-such-target ARGS=1\npython -m medmetric.no_such_tool --x \\\n  1\n```\n"
    spans = code_spans(text)
    assert [t for s in spans for t in _MAKE.findall(s)] == ["no-such-target"]
    assert [m for s in spans for m in _PYTHON_M.findall(s)] == ["medmetric.no_such_tool"]
    assert "no-such-target" not in makefile_targets()
    assert importlib.util.find_spec("medmetric.no_such_tool") is None
