"""The library's own code: which of its modules a piece of it runs, and digests of their sources.

The static import graph: a module's imports at its top and in its functions, not those under `if TYPE_CHECKING:`.
Followed from a stage's script it gives the library modules that stage runs (each must be one of its DVC deps:
tests/test_imports.py); followed from `train` it gives the training code whose digests every checkpoint records,
so that a run is not resumed by other code (`hubert_pipeline.checkpoint`), and from `transcode` the conversion code
a converted folder records, so that a rerun does not keep files of other code (`hubert_pipeline.transcode`).
"""

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

PACKAGE = Path(__file__).parent
# How a stage reads its params, logs and is launched, never what it computes: not followed, not a stage dependency.
BOOKKEEPING = {
    "cli": "argument parsing and logging set-up",
    "params": "reads params.yaml: the values a stage uses are its DVC params, key by key (the fingerprint's too)",
    "tracking": "the MLflow run of a stage",
    "lineage": "MLflow tags naming a stage's inputs and outputs",
    "launch": "local or SLURM execution, the same outputs either way (tests/test_slurm.py)",
}
# Training modules the numbers of a run do not depend on: editing them does not stop a resume.
NOT_NUMERIC = {"io": "atomic file writing", "flops": "the FLOPs logged", "sources": "these digests"}


def _children(node: ast.AST, *, type_checking: bool) -> list[ast.AST]:
    """The nodes under `node`; without type_checking, those that run: an `if TYPE_CHECKING:` block's `else` only."""
    if not type_checking and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
        return list(node.orelse)
    return list(ast.iter_child_nodes(node))


def library_imports(path: Path, *, type_checking: bool = False) -> set[str]:
    """hubert_pipeline modules a file imports when it runs: at the top or in functions; with `type_checking`, also
    those imported under TYPE_CHECKING (for the type checker only)."""
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
        stack.extend(_children(node, type_checking=type_checking))
    return found


def computing_modules(modules: Iterable[str]) -> set[str]:
    """`modules` and the library modules they run, directly or through others, but for the bookkeeping ones."""
    found, stack = set(), list(modules)
    while stack:
        module = stack.pop()
        if module not in found and module not in BOOKKEEPING:
            found.add(module)
            stack.extend(library_imports(PACKAGE / f"{module}.py"))
    return found


def code_digests(entry: str) -> dict[str, str]:
    """{module: sha256 of its source (16 hex digits)} of the code the outputs of module `entry` depend on: it and
    the modules it runs, but for the bookkeeping ones and those the numbers do not depend on."""
    modules = computing_modules([entry]) - NOT_NUMERIC.keys()
    return {m: hashlib.sha256((PACKAGE / f"{m}.py").read_bytes()).hexdigest()[:16] for m in sorted(modules)}


def training_code() -> dict[str, str]:
    """The digests of the code a training run's numbers depend on (every checkpoint records them)."""
    return code_digests("train")


def describe_changes(saved: dict[str, str] | None, current: dict[str, str]) -> str:
    """What differs between the code digests an output recorded and this code's, for a message."""
    if saved is None:
        return "written before its code was recorded"
    changed = sorted(m for m in saved.keys() | current.keys() if saved.get(m) != current.get(m))
    return "changed: " + ", ".join(f"{m}.py" for m in changed)
