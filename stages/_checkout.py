"""Imported first by every stage: the library comes from the checkout this stage file belongs to.

`dvc exp run --queue/--temp` (and `dvc queue start -j N`) runs each experiment in a copy of the repository under
`.dvc/tmp/exps/`, but the editable install resolves `import hubert_pipeline` to the workspace's `src/`, whatever it
holds when the experiment runs. Putting `<this checkout>/src` first on `sys.path`, and first on `PYTHONPATH` for
every process the stage starts (spawned workers, DDP ranks, SLURM jobs, which inherit the environment), makes the
experiment run the code of its own commit: the code DVC hashed.
"""

import os
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

if sys.path[:1] != [SRC]:
    sys.path.insert(0, SRC)
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[:1] != [SRC]:
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
