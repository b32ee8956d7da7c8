"""Benchmark: our pretraining step (`hubert_pipeline.train`) against minimal_hubert's, same model size, same batch.

Both train the SAME batch (same waveforms, lengths, labels and mask, built once by our `data.Collator` from seeded
random audio and random units at 50 Hz) with a model of the SAME size and the SAME initial weights (ours built as
train.py builds it, copied into the reference; state-dict keys and shapes are checked identical). The steps:

- ours: the trainer's own code, imported, not copied: `hubert_pipeline.step.build_training` (model, AdamW fused on
  CUDA, LR schedule, scaler, autocast), `hubert_pipeline.train.build_forward_model` (torch.compile) and
  `optimization_step` (forward under autocast, loss over the masked frames, backward, unscale, grad clip,
  finiteness check, AdamW step, zero_grad, LR scheduler), after the batch is moved to the device and the RNG
  reseeded as train.py's loop does;
- reference (`minimal_hubert.train.train`, one process), transcribed: batch to device, forward under autocast, loss,
  backward, unscale, grad clip, fused AdamW step (its train.py hard-codes `fused=True`, also used here on CPU),
  zero_grad, LR scheduler, its on-device meters. It is reseeded like ours, so both draw the same dropout masks and
  layer drops.

Sizes other than the reference's own (base, large, xlarge) are built by the reference's code with our preset's
values in its config, conv layers and positional convolution (minimal_hubert hard-codes those). bf16 autocast on
CUDA for both (train.py's default dtype); `--compile` compiles both as their trainers do.

Each implementation runs in its own process (the script re-invokes itself with `--impl`), with the same torch
thread count, so that peak memory is attributable. Both warm up, then their timed runs of `--steps` steps
alternate (ours, ref, ref, ours, ...), one process waiting while the other runs, so that a busy spell of a shared
machine hits both. Throughput is audio seconds per wall second, the median of the runs; the median of the
run-by-run ratios is printed too. Peak memory, over the timed runs: on CUDA `torch.cuda.max_memory_allocated`; on
CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS of the process once its model was
built (optimizer state, gradients and activations), and above the RSS at the start of the timed runs (the step's
transient memory). Then forward, backward and optimizer are timed with a sync at each boundary (skip with
`--no-breakdown`); `--profile` prints torch.profiler's top operators of each.

    uv run python bench/train_throughput.py                        # CPU: tiny, 30 s batches of 6 x 5 s
    uv run python bench/train_throughput.py --device cuda          # GPU: base, bf16 autocast, fused AdamW
    uv run python bench/train_throughput.py --device cuda --compile --batch-seconds 87.5
    uv run python bench/train_throughput.py --json > result.json   # machine-readable
"""

import argparse
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

SAMPLE_RATE = 16_000
PHASES = ("forward", "backward", "optimizer")
type Mark = Callable[[str], None]


def _no_mark(_phase: str) -> None:
    pass


# ---------------------------------------------------------------- memory of this process (Linux)


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Set VmHWM (peak RSS) to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory() -> None:
    """Collect garbage and give glibc's free heap back to the system, so that RSS counts live memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------- batch and models


def make_batch(args: argparse.Namespace) -> Any:
    """One batch as our data pipeline makes it: seeded random audio and units, cropped and masked by our Collator."""
    import torch
    from spidr.config import MaskingConfig

    from hubert_pipeline.data import Collator, model_frames
    from hubert_pipeline.params import TrainParams

    cfg = TrainParams()
    generator = torch.Generator().manual_seed(args.seed)
    count = max(1, round(args.batch_seconds / args.utt_seconds))
    samples = round(args.utt_seconds * SAMPLE_RATE)
    items = []
    for _ in range(count):
        waveform = 0.1 * torch.randn(samples, generator=generator)
        units = torch.randint(args.num_classes, (int(model_frames(samples)),), generator=generator)
        items.append((0, waveform, units))
    masking = MaskingConfig(mask_prob=cfg.mask_prob, mask_length=cfg.mask_length)
    collator = Collator(masking, seed=args.seed, max_sample_size=cfg.max_sample_size, pad_audio=cfg.pad_audio)
    return collator(items)


def batch_digest(batch: Any) -> str:
    digest = hashlib.sha256()
    for tensor in (batch.waveforms, batch.labels, batch.mask):
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def reference_sized_as(cfg: Any, size: str) -> Generator[None]:
    """minimal_hubert's model code, with our preset's values where it hard-codes base/large/xlarge ones."""
    from minimal_hubert import model as ref
    from minimal_hubert.config import HuBERTConfig

    values = HuBERTConfig(
        size=size,  # ty: ignore[invalid-argument-type]
        **{name: getattr(cfg, name) for name in HuBERTConfig.__dataclass_fields__ if name != "size"},
    )
    original_pos_conv = ref.ConvPositionalEmbedding

    def pos_conv(embed_dim: int, kernel_size: int, groups: int, depth: int) -> Any:  # noqa: ARG001
        return original_pos_conv(embed_dim, cfg.pos_conv_kernel, cfg.pos_conv_groups, depth)

    patches = {
        "HuBERTConfig": types.SimpleNamespace(from_size=lambda _size: values),
        "DEFAULT_CONV_LAYER_CONFIG": [tuple(layer) for layer in cfg.conv_layers],
        "ConvPositionalEmbedding": pos_conv,
        "_LOGIT_TEMPERATURE": cfg.logit_temperature,
    }
    saved = {name: getattr(ref, name) for name in patches}
    try:
        for name, value in patches.items():
            setattr(ref, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(ref, name, value)


def our_training(args: argparse.Namespace, device: Any) -> tuple[Any, Any, Any]:
    """(TrainParams, model, Optimization) as train.py builds them: `build_training`, initial weights from the seed."""
    from hubert_pipeline.model import HubertConfig
    from hubert_pipeline.params import TrainParams
    from hubert_pipeline.step import build_training

    cfg = TrainParams(seed=args.seed, compile=args.compile)  # the recipe's step (bf16 autocast on CUDA)
    model_cfg = HubertConfig.preset(args.size)
    model, opt = build_training(cfg, model_cfg, args.num_classes, device)
    return cfg, model, opt


def build_reference(args: argparse.Namespace) -> Any:
    """minimal_hubert's HuBERTPretrain of our preset's size, holding a copy of our initial weights (CPU)."""
    import torch
    from minimal_hubert.model import HuBERTPretrain as RefPretrain

    _, ours, _ = our_training(args, torch.device("cpu"))
    with reference_sized_as(ours.config, args.size):
        reference = RefPretrain(args.num_classes, size=args.size)
    ours_state, ref_state = ours.state_dict(), reference.state_dict()
    shapes = {k: tuple(v.shape) for k, v in ours_state.items()}
    if shapes != {k: tuple(v.shape) for k, v in ref_state.items()}:
        raise RuntimeError(f"the reference built for size {args.size!r} does not have our state-dict keys and shapes")
    with torch.no_grad():
        for key, value in ref_state.items():
            value.copy_(ours_state[key])
    return reference


# ---------------------------------------------------------------- the two training steps


class OurTrainer:
    """Our trainer's step, called: `optimization_step` on the model `build_training` made (one process)."""

    def __init__(self, args: argparse.Namespace, device: Any) -> None:
        from hubert_pipeline.train import build_forward_model

        self.device = device
        self.cfg, self.model, self.opt = our_training(args, device)
        self.forward_model = build_forward_model(self.model, compile_model=self.cfg.compile,
                                                 find_unused_parameters=False, world_size=1)  # fmt: skip

    def step(self, cpu_batch: Any, step: int, mark: Mark = _no_mark) -> float | None:
        """One step of train.py's loop (batch to device, reseed, step); the mean masked-frame loss on step 0 only.

        With a `mark` (the phase breakdown), hooks mark the end of the forward (a forward hook) and of the backward
        (an optimizer pre-hook: it includes unscaling, clipping and the step's host sync); they are removed after
        the step (a compiled model recompiles for them: the breakdown is not timed with the throughput).
        """
        import torch

        from hubert_pipeline.step import optimization_step

        hooks = []
        if mark is not _no_mark:
            hooks.append(self.model.register_forward_hook(lambda *_: mark("forward")))
            hooks.append(self.opt.optimizer.register_step_pre_hook(lambda *_: mark("backward")))
        try:
            micro = [cpu_batch.to(self.device)]
            torch.manual_seed(hash((self.cfg.seed, 0, step)) % 2**62)  # train.py's loop, rank 0
            result = optimization_step(self.model, micro, self.opt, cfg=self.cfg, step=step,
                                       forward_model=self.forward_model)  # fmt: skip
        finally:
            for hook in hooks:
                hook.remove()
        mark("optimizer")
        return result.metrics["train_loss"] if step == 0 else None


class ReferenceTrainer:
    """The optimizer set-up and the step of minimal_hubert.train.train (one process, no DDP)."""

    def __init__(self, model: Any, device: Any, *, compile_model: bool) -> None:
        import torch
        from minimal_hubert.train import LinearDecayLRScheduler
        from spidr.tools import AverageMeters

        from hubert_pipeline.params import TrainParams

        cfg = TrainParams()  # the same hyper-parameters as ours (they do not change the step's cost)
        self.model, self.device, self.max_norm = model, device, cfg.grad_clip
        self.dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.dtype]
        self.use_autocast = device.type == "cuda"  # cfg.optimizer.mixed_precision (its trainer is CUDA only)
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=(cfg.betas[0], cfg.betas[1]),
            eps=cfg.eps,
            fused=True,
        )
        self.scaler = torch.GradScaler(device.type, enabled=self.use_autocast and self.dtype == torch.float16)
        self.scheduler = LinearDecayLRScheduler(self.optimizer, cfg.warmup_steps, cfg.max_steps)
        self.meters = AverageMeters(["loss", "grad_norm", "batch_size", "feature_loss"], device=device)
        if compile_model:
            model.compile(dynamic=True)
        self.seed = cfg.seed

    def step(self, cpu_batch: Any, step: int, mark: Mark = _no_mark) -> float | None:
        """One optimizer step; returns the mean masked-frame logits loss on the first step only (it syncs)."""
        import torch

        device, optimizer = self.device, self.optimizer
        waveforms, labels, attn_mask, mask = (
            cpu_batch.waveforms, cpu_batch.labels, cpu_batch.attention_mask, cpu_batch.mask
        )  # fmt: skip
        torch.manual_seed(hash((self.seed, 0, step)) % 2**62)  # not in its trainer: the same randomness as ours
        num_frames = mask.sum().to(device, non_blocking=True)
        with torch.autocast(device.type, self.dtype, self.use_autocast):
            loss, outputs = self.model(
                waveforms.to(device, non_blocking=True),
                labels.to(device, non_blocking=True),
                mask=mask.to(device, non_blocking=True),
                attention_mask=attn_mask.to(device, non_blocking=True) if attn_mask is not None else None,
            )
        loss = loss.sum() / num_frames
        mark("forward")
        self.scaler.scale(loss).backward()
        mark("backward")
        self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        _ = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.meters.update(
            loss=loss.detach(), batch_size=waveforms.size(0), grad_norm=grad_norm, feature_loss=outputs["feature_loss"]
        )
        mark("optimizer")
        return float(outputs["logits_loss"].detach().float().mean()) if step == 0 else None


# ---------------------------------------------------------------- one implementation, in this process


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Worker:
    """One implementation in this process: built and warmed up, then timed run by run as the parent asks."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        torch.set_num_threads(args.threads)
        self.args, self.device = args, torch.device(args.device)
        batch = make_batch(args)
        self.digest = batch_digest(batch)
        if self.device.type == "cuda":
            batch = type(batch)(*(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in vars(batch).values()))
        self.batch = batch
        if args.impl == "ours":
            self.trainer: OurTrainer | ReferenceTrainer = OurTrainer(args, self.device)
            self.model = self.trainer.model
        else:
            self.model = build_reference(args).to(self.device).train()
            self.trainer = ReferenceTrainer(self.model, self.device, compile_model=args.compile)
        release_free_memory()
        self.rss_model = rss_bytes()  # the model (and the optimizer object: its state comes with the first step)
        self.first_loss = self.trainer.step(batch, 0)
        for step in range(1, args.warmup):
            self.trainer.step(batch, step)
        self.step = max(args.warmup, 1)
        sync(self.device)
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_start, self.peak_reset = rss_bytes(), reset_peak_rss()

    def hello(self) -> dict[str, Any]:
        batch = self.batch
        return {
            "impl": self.args.impl,
            "batch_digest": self.digest,
            "batch": {
                "utterances": batch.waveforms.shape[0],
                "audio_seconds": batch.audio_seconds,
                "frames": int(batch.labels.numel()),
                "masked_frames": int(batch.mask.sum()),
            },
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "first_step_loss": self.first_loss,
        }

    def run(self) -> dict[str, float]:
        """`--steps` steps, timed: wall and CPU seconds, audio seconds per second."""
        sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(self.args.steps):
            self.trainer.step(self.batch, self.step)
            self.step += 1
        sync(self.device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return {"wall_s": wall, "cpu_s": cpu, "audio_per_s": self.args.steps * self.batch.audio_seconds / wall}

    def phases(self) -> dict[str, float]:
        """Median seconds of each phase over `--steps` steps, synced at each boundary (stalls a GPU: not timed)."""
        phases: dict[str, list[float]] = {p: [] for p in PHASES}
        for _ in range(self.args.steps):
            sync(self.device)
            last = [time.perf_counter()]

            def mark(phase: str, last: list[float] = last) -> None:
                sync(self.device)
                now = time.perf_counter()
                phases[phase].append(now - last[0])
                last[0] = now

            self.trainer.step(self.batch, self.step, mark)
            self.step += 1
        return {p: statistics.median(v) for p, v in phases.items()}

    def memory(self) -> dict[str, float]:
        """Peak memory since the end of the warm-up, in MiB."""
        import torch

        if self.device.type == "cuda":
            return {
                "peak_mib": torch.cuda.max_memory_allocated(self.device) / 2**20,
                "reserved_mib": torch.cuda.max_memory_reserved(self.device) / 2**20,
            }
        peak = peak_rss_bytes()
        return {
            "peak_mib": (peak - self.rss_model) / 2**20,
            "transient_mib": (peak - self.rss_start) / 2**20,
            "peak_rss_mib": peak / 2**20,
            "peak_is_lifetime": float(not self.peak_reset),
        }

    def profile(self) -> None:
        """torch.profiler's most expensive operators over 3 steps, to stderr."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(3):
                self.trainer.step(self.batch, self.step)
                self.step += 1
            sync(self.device)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(f"--- {self.args.impl}: 3 steps, by {sort}", file=sys.stderr)
        print(prof.key_averages().table(sort_by=sort, row_limit=25), file=sys.stderr)


def serve(args: argparse.Namespace) -> None:
    """The child process: answer the parent's commands (one line each on stdin) with one JSON line each on stdout."""
    worker = Worker(args)
    answers: dict[str, Callable[[], Any]] = {"run": worker.run, "phases": worker.phases, "memory": worker.memory,
                                             "profile": worker.profile}  # fmt: skip
    print(json.dumps(worker.hello()), flush=True)
    for line in sys.stdin:
        if (command := line.strip()) == "exit":
            return
        print(json.dumps(answers[command]()), flush=True)


# ---------------------------------------------------------------- the comparison, in the parent process


class Child:
    """A `--impl` process of this script, asked one command at a time (the other one waits meanwhile)."""

    def __init__(self, impl: str, args: argparse.Namespace) -> None:
        command = [sys.executable, __file__, "--impl", impl, "--device", args.device, "--size", args.size]
        command += ["--threads", str(args.threads), "--batch-seconds", str(args.batch_seconds)]
        command += ["--utt-seconds", str(args.utt_seconds), "--num-classes", str(args.num_classes)]
        command += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(args.seed)]
        command += ["--compile"] if args.compile else []
        self.impl = impl
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def answer(self) -> Any:
        assert self.process.stdout is not None
        if not (line := self.process.stdout.readline()):
            raise RuntimeError(f"the {self.impl} process ended (exit status {self.process.wait()}); see above")
        return json.loads(line)

    def ask(self, command: str) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.answer()

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.process.communicate("exit\n", timeout=60)
        if self.process.poll() is None:
            self.process.kill()


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Both processes warmed up, then their timed runs alternated (ours, ref, ref, ours, ...) so load hits both."""
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        children = {impl: Child(impl, args) for impl in ("ours", "ref")}
        for child in children.values():
            stack.callback(child.close)
        for impl, child in children.items():  # both warm up at the same time: nothing is timed yet
            results[impl] = child.answer() | {"runs": []}
        for repeat in range(args.repeats):
            for impl in ("ours", "ref") if repeat % 2 == 0 else ("ref", "ours"):
                results[impl]["runs"].append(run := children[impl].ask("run"))
                print(f"  run {repeat + 1}, {impl}: {run['audio_per_s']:.1f} audio s / s", file=sys.stderr)
        for impl, child in children.items():
            results[impl]["memory"] = child.ask("memory")
            results[impl]["phases_s"] = child.ask("phases") if args.breakdown else {}
            if args.profile:
                child.ask("profile")
    if results["ours"]["batch_digest"] != results["ref"]["batch_digest"]:
        raise RuntimeError("the two processes did not train the same batch")
    if results["ours"]["parameters"] != results["ref"]["parameters"]:
        raise RuntimeError("the two models do not have the same number of parameters")
    return results


def summarize(args: argparse.Namespace, results: dict[str, dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"env": env, "args": {k: v for k, v in vars(args).items() if k != "impl"}}
    summary["batch"] = results["ours"]["batch"] | {"parameters": results["ours"]["parameters"]}
    for impl, r in results.items():
        runs = r["runs"]
        summary[impl] = {
            "audio_per_s": statistics.median(run["audio_per_s"] for run in runs),
            "best_audio_per_s": max(run["audio_per_s"] for run in runs),
            "step_s": statistics.median(run["wall_s"] for run in runs) / args.steps,
            "cpu_s_per_step": statistics.median(run["cpu_s"] for run in runs) / args.steps,
            "memory": r["memory"],
            "phases_s": r["phases_s"],
            "first_step_loss": r["first_step_loss"],
            "all_audio_per_s": [run["audio_per_s"] for run in runs],
        }
    ours, ref = summary["ours"], summary["ref"]
    summary["throughput_ratio"] = ours["audio_per_s"] / ref["audio_per_s"]
    summary["paired_throughput_ratio"] = statistics.median(
        a / b for a, b in zip(ours["all_audio_per_s"], ref["all_audio_per_s"], strict=True)
    )
    summary["peak_memory_ratio"] = ours["memory"]["peak_mib"] / ref["memory"]["peak_mib"]
    if "transient_mib" in ours["memory"]:
        summary["transient_memory_ratio"] = ours["memory"]["transient_mib"] / ref["memory"]["transient_mib"]
    return summary


def print_table(s: dict[str, Any]) -> None:
    ours, ref, b, e = s["ours"], s["ref"], s["batch"], s["env"]
    print(f"torch {e['torch']}, device {e['device_name']}, {e['threads']} threads, {e['cpu_count']} cores; "
          f"load average {e['load_before']:.1f} before, {e['load_after']:.1f} after")  # fmt: skip
    print(f"size {s['args']['size']} ({b['parameters']:,} parameters), batch {b['utterances']} x "
          f"{b['audio_seconds'] / b['utterances']:.2f} s = {b['audio_seconds']:.1f} s of audio, {b['frames']} frames "
          f"({b['masked_frames']} masked), k={s['args']['num_classes']}, compile={s['args']['compile']}")  # fmt: skip
    print(f"{s['args']['repeats']} timed runs of {s['args']['steps']} steps each, alternated between the two "
          f"processes, after {s['args']['warmup']} warm-up steps")  # fmt: skip
    rows: list[tuple[str, str, str]] = [
        ("audio s / s, median", f"{ours['audio_per_s']:.1f}", f"{ref['audio_per_s']:.1f}"),
        ("audio s / s, best", f"{ours['best_audio_per_s']:.1f}", f"{ref['best_audio_per_s']:.1f}"),
        ("step (s), median", f"{ours['step_s']:.3f}", f"{ref['step_s']:.3f}"),
        ("CPU s per step, median", f"{ours['cpu_s_per_step']:.3f}", f"{ref['cpu_s_per_step']:.3f}"),
    ]
    labels = {"peak_mib": "peak memory (MiB)", "transient_mib": "  of which transient (MiB)",
              "peak_rss_mib": "peak RSS of the process (MiB)", "reserved_mib": "peak reserved (MiB)"}  # fmt: skip
    rows += [(label, f"{ours['memory'][k]:.0f}", f"{ref['memory'][k]:.0f}") for k, label in labels.items()
             if k in ours["memory"]]  # fmt: skip
    rows += [(f"{p} (s, synced)", f"{ours['phases_s'][p]:.3f}", f"{ref['phases_s'][p]:.3f}") for p in ours["phases_s"]]
    rows.append(("first-step loss", f"{ours['first_step_loss']:.5f}", f"{ref['first_step_loss']:.5f}"))
    print(f"{'':32} {'ours':>10} {'reference':>10}")
    for label, a, c in rows:
        print(f"{label:32} {a:>10} {c:>10}")
    print("audio s / s of every run: ours " + " ".join(f"{v:.1f}" for v in ours["all_audio_per_s"])
          + "; reference " + " ".join(f"{v:.1f}" for v in ref["all_audio_per_s"]))  # fmt: skip
    if ours["memory"].get("peak_is_lifetime"):
        print("(this kernel does not let the peak RSS be reset: peaks include the warm-up steps)")
    print(f"throughput ratio (ours/ref): {s['throughput_ratio']:.2f}x")
    print(f"  median of the run-by-run ratios: {s['paired_throughput_ratio']:.2f}x")
    print(f"peak memory ratio (ours/ref): {s['peak_memory_ratio']:.2f}x")
    if "transient_memory_ratio" in s:
        print(f"  transient memory ratio (ours/ref): {s['transient_memory_ratio']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--size", choices=("tiny", "base", "large", "xlarge"), help="default: tiny on CPU, base on GPU")
    parser.add_argument("--batch-seconds", type=float, default=30.0, help="audio per batch (train.py: 30 s)")
    parser.add_argument("--utt-seconds", type=float, default=5.0, help="length of every utterance of the batch")
    parser.add_argument("--num-classes", type=int, default=100, help="k: random units in [0, k)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=8, help="timed runs of each, alternated; medians reported")
    parser.add_argument("--threads", type=int, help="torch threads of both (default: torch's default here)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (dynamic=True)")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip the per-phase timing")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of each (stderr)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument("--impl", choices=("ours", "ref"), help=argparse.SUPPRESS)  # the child processes
    args = parser.parse_args()

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.size = args.size or ("base" if args.device == "cuda" else "tiny")
    args.threads = args.threads or torch.get_num_threads()
    if args.impl is not None:
        serve(args)
        return

    load_before = os.getloadavg()[0]
    print(f"starting both processes ({args.size}, {args.device}, {args.threads} threads)", file=sys.stderr)
    results = compare(args)
    env = {
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    summary = summarize(args, results, env)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)


if __name__ == "__main__":
    main()
