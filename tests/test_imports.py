"""The library's modules import one another in one direction: no import circles (CONVENTIONS.md, rule 12)."""

import ast
from pathlib import Path

import hubert_pipeline

PACKAGE = Path(hubert_pipeline.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """hubert_pipeline modules imported anywhere in the file: at the top, in functions, under TYPE_CHECKING."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hubert_pipeline."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("hubert_pipeline.")}
    return found - {path.stem}


def test_no_module_of_the_library_imports_itself_back_through_another():
    graph = {path.stem: imported_modules(path) for path in PACKAGE.glob("*.py")}
    circles = []
    for start, imported in graph.items():
        stack, seen = list(imported), set()
        while stack:
            module = stack.pop()
            if module == start:
                circles.append(start)
                break
            if module not in seen:
                seen.add(module)
                stack.extend(graph.get(module, ()))
    assert circles == [], f"modules on an import circle: {sorted(circles)}"
