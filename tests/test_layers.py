"""The core's folders are layers (ARCHITECTURE.md): each imports only from the layers below it."""
from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "shared" / "mace_core"
#: layer -> the layers it may import from (besides the shared modules errors, files, plugins)
ALLOWED = {"model": set(), "method": {"model"}, "run": {"method", "model"}, "eval": {"method", "model"},
           "export": set(), "cli": {"model", "method", "run", "eval", "export"}}


def _imported_layers(path: Path) -> set[str]:
    """The core layers ``path`` imports from (relative or absolute imports, also inside functions)."""
    layer = path.parent.name
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0 and node.module and node.module.startswith("mace_core."):
            parts = node.module.split(".")[1:]
        elif node.level == 1:
            parts = [layer]
        elif node.level == 2:
            parts = (node.module or "").split(".") if node.module else [a.name for a in node.names]
        else:
            continue
        if parts and parts[0] in ALLOWED:
            found.add(parts[0])
    return found - {layer}


def test_every_module_sits_in_a_layer():
    flat = sorted(p.name for p in CORE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "errors.py", "files.py", "plugins.py"], flat
    assert sorted(p.name for p in CORE.iterdir() if (p / "__init__.py").exists()) == sorted(ALLOWED)


def test_layers_import_only_downward():
    wrong = {f"{p.relative_to(CORE)} imports {sorted(bad)}"
             for layer, ok in ALLOWED.items() for p in (CORE / layer).glob("*.py")
             if (bad := _imported_layers(p) - ok)}
    assert not wrong, wrong


def test_the_check_sees_an_upward_import(tmp_path):
    """The parser recognises the three spellings of an import from another layer."""
    model = tmp_path / "model"
    model.mkdir()
    for i, line in enumerate(("from ..method.erase import erase", "from mace_core.run import run",
                              "def f():\n    from ..eval import metrics")):
        (model / f"m{i}.py").write_text(line + "\n")
        assert _imported_layers(model / f"m{i}.py") == [{"method"}, {"run"}, {"eval"}][i]
