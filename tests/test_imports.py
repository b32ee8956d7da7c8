"""How the library's modules import one another: in one direction, no import circles (CONVENTIONS.md, rule 12); and
each DVC stage depends on every library module its code imports (CONVENTIONS.md, rule 4)."""

import ast
from pathlib import Path

import yaml

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


ROOT = PACKAGE.parents[1]
# What a stage logs and how it is launched, never what it writes: a change there reruns no stage.
BOOKKEEPING = {
    "cli": "argument parsing and logging set-up",
    "tracking": "the MLflow run of a stage",
    "lineage": "MLflow tags naming a stage's inputs and outputs",
    "launch": "local or SLURM execution, the same outputs either way (tests/test_slurm.py)",
}


def _runtime_children(node: ast.AST) -> list[ast.AST]:
    """The nodes under `node` that run: an `if TYPE_CHECKING:` block's `else` only."""
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
        return list(node.orelse)
    return list(ast.iter_child_nodes(node))


def runtime_imports(path: Path) -> set[str]:
    """hubert_pipeline modules a file imports when it runs: at the top or in functions, not under TYPE_CHECKING."""
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.ImportFrom) and node.module == "hubert_pipeline":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hubert_pipeline."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("hubert_pipeline.")}
        stack.extend(_runtime_children(node))
    return found


def computing_modules(script: Path) -> set[str]:
    """The library modules a stage's script runs, directly or through others, but for the bookkeeping ones."""
    found, stack = set(), list(runtime_imports(script))
    while stack:
        module = stack.pop()
        if module not in found and module not in BOOKKEEPING:
            found.add(module)
            stack.extend(runtime_imports(PACKAGE / f"{module}.py"))
    return found


def test_every_stage_depends_on_the_library_modules_it_runs():
    """dvc.yaml's deps name each library module a stage's code imports, directly or through others, so that a change
    there reruns the stage: one that changed, say, the model's layer outputs but not its training would otherwise
    leave ABX stale, the retrained checkpoints being the same bytes."""
    missing = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        definition = stage.get("do", stage)  # a foreach stage's (convert)
        script = next(word for word in definition["cmd"].split() if word.startswith("stages/"))
        runs = {f"src/hubert_pipeline/{module}.py" for module in computing_modules(ROOT / script)}
        if lacking := sorted(runs - set(definition["deps"])):
            missing[name] = lacking
    assert missing == {}, missing
