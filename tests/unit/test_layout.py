"""The package layout: the design page's table names every module where it is, and the
feature packages stay layered (shared modules never import a feature package)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "imgcls"
FEATURES = ("training", "inference", "evaluation", "serving")


def layout_table() -> dict[str, set[str]]:
    """Folder -> module names that the design page's layout table lists for it."""
    text = (ROOT / "docs" / "design.md").read_text()
    section = text[text.index("## Layout"):]
    section = section[:section.index("\n## ", 1)]
    rows = {}
    for folder, what in re.findall(r"^\| `(imgcls/[a-z_/]*)` \| (.*) \|$", section, flags=re.M):
        # Module names are the backticked words outside brackets (bracketed ones are examples).
        outside = re.sub(r"\([^)]*\)", "", what)
        rows[folder.rstrip("/")] = set(re.findall(r"`([a-z_]+)`", outside))
    return rows


def modules(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}


def test_layout_table_names_every_module_where_it_is():
    rows = layout_table()
    assert set(rows) == {"imgcls", *(f"imgcls/{f}" for f in FEATURES)}, sorted(rows)
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(FEATURES), packages
    for folder, names in rows.items():
        assert names == modules(ROOT / folder), (folder, sorted(names ^ modules(ROOT / folder)))


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imgcls"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("imgcls"))
    return found


def test_shared_modules_import_no_feature_package_and_each_package_says_what_flows():
    # The CLI and the composed jobs sit on top of everything; the rest is shared below.
    top = {"cli", "commands"}
    for name in modules(PACKAGE) - top:
        wrong = {m for m in _imported_modules(PACKAGE / f"{name}.py")
                 if any(m.startswith(f"imgcls.{f}") for f in FEATURES)}
        assert not wrong, f"imgcls/{name}.py is shared but imports {sorted(wrong)}"
    for feature in FEATURES:
        doc = ast.get_docstring(ast.parse((PACKAGE / feature / "__init__.py").read_text()))
        assert doc and "In:" in doc and "Out:" in doc, feature
    # Inference runs what training wrote (checkpoints), never training's code.
    for path in (PACKAGE / "inference").glob("*.py"):
        assert not {m for m in _imported_modules(path) if m.startswith("imgcls.training")}, path
