"""Every command the README gives, run as typed after `bash run.sh demo` (issue 13).

A copy of the repository's tracked files with the reduced params of test_pipeline.py is set up by `bash run.sh demo`
itself (its own .venv, `uv sync --frozen`, the whole pipeline, the summary); then each command of the README, in the
README's order: the lines of its ```bash blocks (a block runs as one shell script, so `wav=$(...)` carries to the next
line) and the `uv run ...` / `bash ...` commands quoted in its prose. Long-running servers (`mlflow ui`,
`mlflow models serve`) are started, polled on their port and stopped. What is not run here says why in EXEMPT.
"""

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_pipeline import TINY

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

CI_RUNS_IT = "what CI runs (.ci/run calls `bash run.sh test`, which runs it); here it would run this test inside itself"
EXEMPT = {  # command (its start) -> why it is not run by this test
    "bash run.sh test": CI_RUNS_IT,
    'uv run pytest -m "slow': CI_RUNS_IT,
    "uv run pytest -m slurm": CI_RUNS_IT,
    "uv run pytest -m server": CI_RUNS_IT,
    "bash run.sh demo_long": "35 minutes to an hour on 2 cores: the demo_long profile, run by hand (docs/learning.md)",
    "uv run python -m hubert_pipeline.summary --rev demo-long": "reads the experiment `bash run.sh demo_long` makes",
    "uv run dvc exp run -S '++convert.corpora={train: /corpora/cv/train": "names the user's own corpora (/corpora/cv): "
    "the same stages run on planted MP3/FLAC corpora in tests/test_transcode.py",
    "bash scripts/tracking_server.sh": "root and PostgreSQL, in /srv and /shared: "
    "test_tracking_server_commands_as_typed runs them under -m server",
}
FIXTURE_RUNS_IT = ["bash", "run.sh", "demo"]
SERVERS = {  # a long-running command (its start or a part of it) -> the URL that answers once it is up
    "uv run mlflow ui": "http://127.0.0.1:5000/health",
    "mlflow models serve": "http://127.0.0.1:5001/ping",
}
LAST = "uv run python -m hubert_pipeline.presets"  # rewrites params.yaml: run after every other command
NO_CUDA = {"uv run python bench/gpu_check.py": "no CUDA device here"}  # without a GPU: its refusal, in seconds
NEEDS_CHROMIUM = "uv run python docs/mlflow_screenshot.py"


@dataclass(frozen=True)
class Block:
    line: int  # where it starts in the README
    commands: tuple[str, ...]
    fenced: bool  # a ```bash block, not a command quoted in the prose


def split_commands(lines: list[str]) -> list[str]:
    """Shell commands of a block: a line ending in `\\` or inside an open quote continues on the next line."""
    commands, pending = [], ""
    for line in lines:
        pending = f"{pending}\n{line}" if pending else line
        if pending.rstrip().endswith("\\"):
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if shlex.split(pending, comments=True):
            commands.append(pending.strip())
        pending = ""
    assert not pending, f"README: unterminated command {pending!r}"
    return commands


def readme_blocks(text: str) -> list[Block]:
    """The README's commands in order: each ```bash block (also indented), each quoted `uv run ...` / `bash ...`."""
    blocks, fence, body = [], None, []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None and stripped == "```bash":
            fence, indent, body = number, len(line) - len(line.lstrip()), []
        elif fence is not None and stripped == "```":
            blocks.append(Block(fence, tuple(split_commands(body)), fenced=True))
            fence = None
        elif fence is not None:
            body.append(line[indent:])
        else:
            blocks.extend(Block(number, (c,), fenced=False) for c in re.findall(r"`((?:uv run|bash) [^`]+)`", line))
    return blocks


def exemption(command: str) -> str | None:
    if shlex.split(command, comments=True) == ["uv", "run", "pytest"]:  # the default suite
        return CI_RUNS_IT
    why = next((why for start, why in EXEMPT.items() if command.startswith(start)), None)
    if why is None and command.startswith(NEEDS_CHROMIUM) and not shutil.which("chromedriver"):
        why = "needs Debian's chromium and chromium-driver (not installed here)"
    return why


def refusal_without_cuda(command: str) -> str | None:
    """What the command prints when it refuses to run on a machine without a GPU (None: it runs here)."""
    return next((why for start, why in NO_CUDA.items() if command.startswith(start)), None) if not _cuda() else None


def server_url(command: str) -> str | None:
    return next((url for part, url in SERVERS.items() if part in command), None)


def environment() -> dict[str, str]:
    """The user's shell: no test venv, no MLflow/DVC settings of the test run."""
    venv_bin = str(REPO / ".venv" / "bin")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "VIRTUAL_ENV", "UV_PROJECT"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
    return env


def sh(script: str, cwd: Path, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-ec", script], cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def must(result: subprocess.CompletedProcess, what: str) -> str:
    """Its output (stdout and stderr) if it exited 0."""
    out = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{out[-6000:]}"
    return out


@contextlib.contextmanager
def server(command: str, url: str, cwd: Path) -> Generator[None]:
    """Start a long-running command, wait until `url` answers, stop it (its whole process group) afterwards."""
    process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=environment(), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url, timeout=2)
                break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{command!r} did not answer {url}:\n{process.communicate(timeout=10)[0][-3000:]}")
            time.sleep(1)
        yield
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(wait)
                break


def wait_for_queue(cwd: Path, timeout: float = 1800) -> str:
    """After `dvc queue start`: wait until no experiment is queued or running and no worker is busy (cleaning up an
    experiment's copy); the final `dvc queue status`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = must(sh("uv run dvc queue status", cwd), "dvc queue status")
        if not re.search(r"\b(Queued|Running)\b", status) and "0 active" in status:
            return status
        time.sleep(10)
    pytest.fail(f"the DVC queue did not finish in {timeout} s:\n{status}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """`bash run.sh demo` in a copy of the repository's tracked files, with test_pipeline.py's reduced params."""
    root = tmp_path_factory.mktemp("readme") / "hubert-pipeline"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    must(sh("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm demo", root), "git init")
    out = must(sh("bash run.sh demo", root, timeout=2400), "bash run.sh demo")
    assert "mlflow ui" in out, out[-2000:]  # the summary's last line
    return root


def test_the_readme_parser_finds_every_command_block_and_quoted_command():
    text = README.read_text()
    blocks = readme_blocks(text)
    assert sum(b.fenced for b in blocks) == sum(line.strip() == "```bash" for line in text.splitlines())
    commands = [c for b in blocks for c in b.commands]
    assert "bash run.sh demo" in commands
    assert all("…" not in c for c in commands), "a placeholder quoted as a command"
    assert "uv run dvc exp run -S kmeans.k=500" in commands  # quoted in the prose
    multi_line = [c for c in commands if c.startswith("uv run python -c '")]
    assert len(multi_line) == 2, multi_line
    assert all(c.count("\n") > 3 and c.endswith("'") for c in multi_line), multi_line
    assert any(c.startswith("uv run dvc exp show --no-pager") and "--drop" in c for c in commands)  # `\` continued
    assert all(exemption(c) is None for c in commands if c.startswith("uv run dvc exp run -S kmeans"))


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the demo and every README command: 15 minutes on a quick machine, 3x that on a slow one
def test_every_readme_command_works_as_typed_after_the_demo(demo):
    blocks = readme_blocks((demo / "README.md").read_text())
    last = [b for b in blocks if b.commands[0].startswith(LAST)]
    ran = []
    with contextlib.ExitStack() as servers:
        for block in [b for b in blocks if b not in last] + last:
            ran += run_block(block, demo, servers)
    assert any(c.startswith("uv run dvc exp run -S kmeans.k_it1=50") for c in ran)
    params = yaml.safe_load((demo / "params.yaml").read_text())
    assert params["model"]["size"] == "base", "the presets command did not rewrite params.yaml"


def run_block(block: Block, cwd: Path, servers: contextlib.ExitStack) -> list[str]:
    """Run a block's commands in order, consecutive ones as one shell script; a server stays up for later blocks."""
    script, ran = [], []
    for command in block.commands:
        if shlex.split(command, comments=True) == FIXTURE_RUNS_IT or exemption(command):
            continue
        ran.append(command)
        url, refusal = server_url(command), refusal_without_cuda(command)
        if url or refusal:
            run_script(script, block, cwd)
            script = []
        if url:
            servers.enter_context(server(command, url, cwd))
        elif refusal:
            result = sh(command, cwd)
            assert result.returncode == 2, result.stderr[-2000:]
            assert refusal in result.stderr, result.stderr[-2000:]
        else:
            script.append(command)
    run_script(script, block, cwd)
    return ran


def run_script(script: list[str], block: Block, cwd: Path) -> None:
    if script:
        out = must(sh("\n".join(script), cwd), f"README line {block.line}: {script}")
        check_output(script, out, cwd)


def check_output(script: list[str], out: str, cwd: Path) -> None:
    """What some commands must have printed or written, beyond exiting 0."""
    text = "\n".join(script)
    if "dvc queue start" in text:
        status = wait_for_queue(cwd)
        assert status.count("Success") >= 3, status
    if "hubert-encode" in text:
        assert (cwd / "units_valid" / "units.jsonl").stat().st_size > 0
    if "/invocations" in text:
        assert '"predictions"' in out, out[-2000:]
    if "hubert_pipeline.convert" in text:
        assert (cwd / "my_teacher").is_dir()
    if "dvc metrics show" in text:
        assert "pnmi" in out, out[-2000:]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.server
def test_tracking_server_commands_as_typed(tmp_path):
    """The README's tracking-server block, as typed (root, PostgreSQL; /srv/mlflow and /shared/mlflow-artifacts)."""
    from conftest import server_available

    if why := server_available():
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    block = next(b for b in readme_blocks(README.read_text()) if b.commands[0].startswith("bash scripts/tracking_"))
    made = [first_missing(Path(p)) for p in ("/srv/mlflow", "/shared/mlflow-artifacts")]
    try:
        out = must(sh("\n".join(block.commands), REPO, timeout=300), "the tracking-server block")
        assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in out, out[-3000:]
    finally:
        sh("bash scripts/tracking_server.sh stop --data /srv/mlflow || true", REPO)
        for path in filter(None, made):
            shutil.rmtree(path, ignore_errors=True)


def first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None if it exists): what a test made and removes."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing
