"""How the library's modules import one another: in one direction, no import circles (CONVENTIONS.md, rule 12); and
each DVC stage depends on every library module its code imports (CONVENTIONS.md, rule 4)."""

import ast
from pathlib import Path

import yaml

import hubert_pipeline
from hubert_pipeline.sources import computing_modules, runtime_imports

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


ROOT = PACKAGE.parents[1]


def test_every_stage_depends_on_the_library_modules_it_runs():
    """dvc.yaml's deps name each library module a stage's code imports, directly or through others, so that a change
    there reruns the stage: one that changed, say, the model's layer outputs but not its training would otherwise
    leave ABX stale, the retrained checkpoints being the same bytes."""
    missing = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        definition = stage.get("do", stage)  # a foreach stage's (convert)
        script = next(word for word in definition["cmd"].split() if word.startswith("stages/"))
        runs = {f"src/hubert_pipeline/{module}.py" for module in computing_modules(runtime_imports(ROOT / script))}
        if lacking := sorted(runs - set(definition["deps"])):
            missing[name] = lacking
    assert missing == {}, missing
