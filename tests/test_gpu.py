"""The trainer's CUDA-only paths: NCCL, fused AdamW, flash attention, the bf16 step. Marked `gpu`, skipped without CUDA.

uv run pytest -m gpu tests/test_gpu.py          # bench/gpu_check.py runs them first
"""

import dataclasses
import socket

import pytest
import torch
from torch.testing import assert_close

from hubert_pipeline.data import Batch, Collator
from hubert_pipeline.model import HubertConfig
from hubert_pipeline.params import TrainParams
from hubert_pipeline.step import build_training, optimization_step
from hubert_pipeline.train import build_forward_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")
NO_DROPOUT = {"encoder_projection_dropout": 0.0, "encoder_attention_dropout": 0.0, "encoder_dropout": 0.0}


# Not tests/equality.py's helpers: those import torchaudio and minimal_hubert, which the GPU machine may lack.
def tiny_config() -> HubertConfig:
    return HubertConfig.preset("tiny", **NO_DROPOUT)


def deterministic_batches(count: int, *, cfg: TrainParams, seconds: float = 1.0) -> list[Batch]:
    """`count` batches of 2 utterances of seeded random audio and units (50 classes), masked by our Collator."""
    from spidr.config import MaskingConfig

    from hubert_pipeline.data import model_frames

    generator, samples = torch.Generator().manual_seed(0), round(seconds * 16_000)
    collator = Collator(MaskingConfig(mask_prob=cfg.mask_prob, mask_length=cfg.mask_length), seed=0,
                        max_sample_size=samples, pad_audio=False)  # fmt: skip
    return [
        collator([(n, 0.1 * torch.randn(samples, generator=generator),
                   torch.randint(50, (int(model_frames(samples)),), generator=generator)) for _ in range(2)])
        for n in range(count)
    ]  # fmt: skip


def test_nccl_all_reduce_in_a_one_process_group_on_the_gpu(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    torch.distributed.init_process_group("nccl", device_id=CUDA)
    try:
        value = torch.ones(3, device=CUDA)
        torch.distributed.all_reduce(value)
        assert value.tolist() == [1.0, 1.0, 1.0]
    finally:
        torch.distributed.destroy_process_group()


def test_fused_adamw_on_cuda_takes_the_step_of_the_cpu_s_adamw():
    """Same model, batch and float32 step (no autocast): the updates agree to float32 reductions on two devices."""
    cfg = dataclasses.replace(TrainParams(), dtype="float32")
    [batch] = deterministic_batches(1, cfg=cfg)
    weights = {}
    for device in (torch.device("cpu"), CUDA):
        model, opt = build_training(cfg, tiny_config(), 50, device)
        assert opt.optimizer.defaults["fused"] == (device.type == "cuda")
        optimization_step(model, [batch.to(device)], opt, cfg=cfg, step=0)
        weights[device.type] = {k: v.cpu() for k, v in model.state_dict().items()}
    for key, expected in weights["cpu"].items():
        assert_close(weights["cuda"][key], expected, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_flash_attention_runs_the_bf16_forward_as_the_math_kernel_does():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, _ = build_training(TrainParams(), tiny_config(), 50, CUDA)
    model.eval()
    [batch] = deterministic_batches(1, cfg=TrainParams(), seconds=2.0)
    batch = batch.to(CUDA)
    outputs = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(backend):
            outputs[backend] = model.encoder(model.feature_projection(model._conv_features(batch.waveforms)), None)
    assert_close(outputs[SDPBackend.FLASH_ATTENTION].float(), outputs[SDPBackend.MATH].float(), rtol=2e-2, atol=2e-2)


def test_the_recipe_s_bf16_step_on_cuda_is_finite_and_close_to_float32():
    cfg = TrainParams()  # dtype bfloat16: autocast on CUDA, as train.py runs it
    [batch] = deterministic_batches(1, cfg=cfg)
    metrics = {}
    for dtype in ("float32", "bfloat16"):
        model, opt = build_training(dataclasses.replace(cfg, dtype=dtype), tiny_config(), 50, CUDA)
        assert (opt.autocast_dtype is None) == (dtype == "float32")
        metrics[dtype] = optimization_step(model, [batch.to(CUDA)], opt, cfg=cfg, step=0).metrics
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics["bfloat16"].values())
    assert_close(metrics["bfloat16"]["train_loss"], metrics["float32"]["train_loss"], rtol=1e-2, atol=0.0)


def test_compiled_step_on_cuda_gives_the_eager_losses():
    cfg = dataclasses.replace(TrainParams(), dtype="float32")
    batches = deterministic_batches(3, cfg=cfg)
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model, opt = build_training(cfg, tiny_config(), 50, CUDA)
        forward = build_forward_model(model, compile_model=compiled, find_unused_parameters=False, world_size=1)
        losses[compiled] = [
            optimization_step(model, [b.to(CUDA)], opt, cfg=cfg, step=i, forward_model=forward).metrics["train_loss"]
            for i, b in enumerate(batches)
        ]
    assert_close(losses[True], losses[False], rtol=1e-3, atol=0.0)
