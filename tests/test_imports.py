"""How the library's modules import one another: in one direction, no import circles (CONVENTIONS.md, rule 12); and
each DVC stage depends on every library module its code imports (CONVENTIONS.md, rule 4)."""

from pathlib import Path

import yaml

import hubert_pipeline
from hubert_pipeline.sources import computing_modules, library_imports

PACKAGE = Path(hubert_pipeline.__file__).parent


def test_no_module_of_the_library_imports_itself_back_through_another():
    graph = {path.stem: library_imports(path, type_checking=True) - {path.stem} for path in PACKAGE.glob("*.py")}
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
        runs = {f"src/hubert_pipeline/{module}.py" for module in computing_modules(library_imports(ROOT / script))}
        if lacking := sorted(runs - set(definition["deps"])):
            missing[name] = lacking
    assert missing == {}, missing
