"""Our training step equals the references': torchaudio's port of fairseq (one step), minimal_hubert (100 steps).

Dropout and layer drop off, the same initial weights, the same batches and masks; the harness is tests/equality.py.
Both references compute the logits in float32 whatever the model's dtype (fairseq's `compute_nce` and
`get_logits`, copied by torchaudio and minimal_hubert: `cosine_similarity(x.float(), targets.float())`), and so do
we (LogitGenerator: normalised float32 vectors, one matmul). The two computations round differently, so even in
float64 the losses and gradients agree to float32 rounding (a float32 ulp is 1.2e-7 relative), not to float64's.
"""

import pytest
import torch
from equality import (
    MinimalHubertTrainer,
    assert_close_to_scale,
    build_ours,
    deterministic_batches,
    fairseq_hubert_criterion,
    minimal_hubert_copy,
    objective,
    tiny_config,
    torchaudio_forward,
    torchaudio_model,
)
from minimal_hubert.train import LinearDecayLRScheduler
from torch.testing import assert_close

from hubert_pipeline.compat import to_native
from hubert_pipeline.params import TrainParams
from hubert_pipeline.train import lr_lambda, optimization_step

pytestmark = pytest.mark.usefixtures("one_thread")


# Largest differences measured (relative to each gradient's largest magnitude): 4.8e-7 in float64, 1.3e-6 in float32.
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 2e-6), (torch.float32, 1e-5)], ids=["float64", "float32"])
def test_one_step_gives_torchaudio_s_loss_and_gradients_under_fairseq_s_criterion(dtype, rtol):
    cfg = TrainParams()  # feature_penalty 10 = fairseq's loss_weights [10]; grad_clip 10 = its clip_norm
    model_cfg = tiny_config()  # feature_grad_mult 0.1, as fairseq's base and torchaudio's
    torch.manual_seed(1)
    reference = torchaudio_model(model_cfg, cfg).to(dtype).train()
    ours, opt = build_ours(cfg, model_cfg, dtype=dtype)
    ours.load_state_dict(to_native(reference.state_dict(), for_pretraining=True, config=model_cfg)[0], strict=True)
    [batch] = deterministic_batches(1, cfg=cfg, dtype=dtype)
    names = {p: name for name, p in ours.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    def record_clipped_gradients(optimizer, _args, _kwargs) -> None:
        grads.update({names[p]: p.grad.clone() for group in optimizer.param_groups for p in group["params"]})

    opt.optimizer.register_step_pre_hook(record_clipped_gradients)
    result = optimization_step(ours, [batch], opt, cfg=cfg, step=0)

    logit_m, logit_u, features_pen = torchaudio_forward(reference, batch)
    loss, sample_size = fairseq_hubert_criterion([logit_m], [logit_u], [features_pen])
    (loss / sample_size).backward()  # fairseq's trainer: gradients divided by sample_size
    grad_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.grad_clip)
    reference_grads = {k: p.grad for k, p in reference.named_parameters() if p.grad is not None}
    reference_grads = to_native(reference_grads, for_pretraining=True, config=model_cfg)[0]
    reference_grads = {k: v for k, v in reference_grads.items() if k != "logit_generator.logit_temp"}  # a buffer

    assert sample_size == int(batch.mask.sum())
    assert_close(objective(result.metrics, cfg), float(loss.detach()) / sample_size, rtol=1e-6, atol=0.0)
    assert_close(result.metrics["grad_norm"], float(grad_norm), rtol=1e-6, atol=0.0)
    assert len(grads) == len(list(ours.parameters()))
    assert_close_to_scale(grads, reference_grads, rtol=rtol)


def test_lr_schedule_is_minimal_hubert_s_in_warmup_and_a_step_behind_it_in_decay():
    """Update k: ours lr x lr_lambda(k) (fairseq's polynomial_decay in decay); minimal_hubert decays a step earlier."""
    warmup, max_steps = 4, 12
    ours = [lr_lambda(warmup, max_steps)(k) for k in range(max_steps)]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = LinearDecayLRScheduler(optimizer, warmup, max_steps)
    reference = []
    for _ in range(max_steps):
        reference.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert ours[:warmup] == reference[:warmup] == [0.25, 0.5, 0.75, 1.0]
    assert ours[warmup] == 1.0  # the peak held for two updates
    assert_close(reference[warmup:-1], ours[warmup + 1 :])
    assert (reference[-1], ours[-1]) == (0.0, 1 / (max_steps - warmup))  # minimal_hubert's last update is lost


STEPS = 100


@pytest.mark.slow
def test_hundred_steps_in_float64_follow_minimal_hubert_s_losses_and_weights():
    """Its model, AdamW (fused), LR schedule, clipping and loss against train.py's; 4 batches, 25 times each.

    Set to what minimal_hubert does: feature penalty weight 1 (it adds the penalty to every frame's loss; fairseq
    weighs it 10) and no gradient scaling into the conv extractor (it has no feature_grad_mult; fairseq 0.1), and
    the steps within the warmup, where the two LR schedules agree (see the test above).
    Tolerances: float32 logits on both sides (module docstring) make every step's gradients differ by ~1e-7
    relative, and AdamW carries that on without growth. Measured over the 100 steps: losses differ by at most
    6.3e-7, final weights by at most 1.2e-6 of each tensor's largest magnitude (2.5e-6 after 10 steps). Tolerances:
    3e-6 on losses (6 float32 ulps of the first loss, about 4), 1e-5 on weights.
    """
    cfg = TrainParams(lr=2e-3, warmup_steps=STEPS, max_steps=2 * STEPS, feature_penalty=1.0)
    ours, opt = build_ours(cfg, tiny_config(feature_grad_mult=1.0), dtype=torch.float64)
    reference = MinimalHubertTrainer(minimal_hubert_copy(ours), cfg)
    batches = deterministic_batches(4, cfg=cfg, seconds=0.5, dtype=torch.float64)
    ours_losses, reference_losses = [], []
    for step in range(STEPS):
        batch = batches[step % len(batches)]
        result = optimization_step(ours, [batch], opt, cfg=cfg, step=step)
        reference_loss, reference_lr = reference.step(batch)
        assert result.metrics["lr"] == reference_lr
        ours_losses.append(objective(result.metrics, cfg))
        reference_losses.append(reference_loss)

    assert_close(ours_losses, reference_losses, rtol=0.0, atol=3e-6)
    assert_close_to_scale(ours.state_dict(), reference.model.state_dict(), rtol=1e-5)
    assert ours_losses[-1] < 0.5 * ours_losses[0]  # it learns (the 4 batches): the weights did move
