"""The GPU paths, tested on the CPU: no host-device wait inside a training step, loading straight into the
target precision, fp16 loss scales wherever gradients are taken, and sample.py's NaN warning.

A host-device wait can only be counted on CUDA (torch.cuda.set_sync_debug_mode; bench_gpu.py's check).
Here the pieces are tested instead: on the meta device (no data at all) any read of a value fails, so a
splice, a word and DDPM.add_noise that run there read nothing; a whole train_step reads the host once.
"""
import os
import sys
from contextlib import contextmanager

import pytest
import torch

import minti
from minti.clip import CLIPTextConfig, CLIPTextModel
from minti import timesteps
from minti.schedulers import DDPM
from minti.textual_inversion import LearnedWord, splice, train_step
from minti.timesteps import AdaptiveTimesteps, g_readings
from minti.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=10, bos_token_id=62, eos_token_id=63)
UNET = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=2,
                  cross_attention_dim=24, norm_num_groups=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), sample_size=8)


@contextmanager
def counting_host_reads():
    """Count minti's Tensor.item / .tolist / .cpu / bool(tensor) calls (each a wait for the device off
    the CPU); torch's own are not counted (AdamW's CPU path reads its step count; fused AdamW on CUDA
    does not)."""
    counts = {"item": 0, "tolist": 0, "cpu": 0, "__bool__": 0}
    saved = {name: getattr(torch.Tensor, name) for name in counts}

    def counted(name):
        def read(self, *args, **kwargs):
            if self.device.type == "meta":
                raise AssertionError(f"Tensor.{name} on the meta device: a host read")
            caller = sys._getframe(1).f_code.co_filename
            counts[name] += os.path.join(ROOT, "minti") in caller
            return saved[name](self, *args, **kwargs)
        return read
    for name in counts:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield counts
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_the_splice_the_word_and_add_noise_read_no_value_on_a_device():
    word = LearnedWord(torch.randn(3, 2, 8), [10, 11]).to("meta")  # multiresolution: 3 buckets
    ids = torch.zeros(4, 6, dtype=torch.long, device="meta")
    table = torch.randn(10, 8, device="meta")
    t = torch.zeros(4, dtype=torch.long, device="meta")
    ddpm, x = DDPM(), torch.zeros(4, 4, 8, 8, device="meta")
    with counting_host_reads():
        assert word(ids, table, t).shape == (4, 6, 8)
        assert splice(ids, table, word.token_ids, word.vectors[0]).shape == (4, 6, 8)
        assert ddpm.add_noise(x, x, t).shape == x.shape


def test_the_schedule_is_copied_to_a_device_once():
    ddpm = DDPM()
    first = ddpm.alphas_cumprod_on("cpu", torch.bfloat16)
    assert ddpm.alphas_cumprod_on("cpu", torch.bfloat16) is first and first.dtype == torch.bfloat16
    ddpm.alphas_cumprod = ddpm.alphas_cumprod * 1.0  # a replaced schedule is copied again
    assert ddpm.alphas_cumprod_on("cpu", torch.bfloat16) is not first


def test_a_training_step_reads_the_host_once():
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**TEXT)).eval().requires_grad_(False)
    unet = UNet(UNET).eval().requires_grad_(False)
    word = LearnedWord(torch.randn(1, 24) * 0.1, [64])
    sampler, optimizer = AdaptiveTimesteps(), torch.optim.AdamW([word.vectors], lr=1e-3)
    ids = torch.tensor([[62, 10, 64, 63, 63, 63, 63, 63, 63, 63]] * 2)
    batches = [(ids, torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 4, 8, 8))] * 2
    with counting_host_reads() as counts:
        train_step(te, unet, DDPM(), word, optimizer, batches, sampler)
    # one trip: the loss, the gradient's finiteness and the readings come to the host together
    assert counts["item"] == 1 and counts["cpu"] == 1
    assert sampler.count.sum() == 4  # the readings of both micro-batches reached the sampler


@pytest.mark.cuda  # counts host-device waits: on CUDA only (conftest skips it elsewhere)
def test_a_training_step_waits_for_the_device_once_on_cuda():
    """Not yet run on a GPU (written on a CPU-only machine): bench_gpu.py's sync check covers the same."""
    import warnings

    from minti.textual_inversion import adamw

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**TEXT)).eval().requires_grad_(False).cuda()
    unet = UNet(UNET).eval().requires_grad_(False).cuda()
    word = LearnedWord(torch.randn(1, 24) * 0.1, [64]).cuda()
    sampler, optimizer, ddpm = AdaptiveTimesteps(), adamw(word, 1e-3), DDPM()
    ids = torch.tensor([[62, 10, 64, 63, 63, 63, 63, 63, 63, 63]] * 2)
    batches = [tuple(x.cuda() for x in (ids, torch.randn(2, 4, 8, 8), torch.tensor([10, 900]),
                                        torch.randn(2, 4, 8, 8)))] * 2
    train_step(te, unet, ddpm, word, optimizer, batches, sampler)  # the first: allocations, the schedule
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_step(te, unet, ddpm, word, optimizer, batches, sampler)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    waits = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(waits) == 1, waits  # the loss, the gradient's finiteness and the readings, together


def test_load_casts_each_component_as_asked_and_equals_load_then_cast():
    sd = minti.load("toy", dtype={"unet": torch.bfloat16, "text_encoder": "fp16"})
    assert sd.unet.dtype == torch.bfloat16 and sd.text_encoder.text_model.final_layer_norm.weight.dtype == \
        torch.float16 and next(sd.vae.parameters()).dtype == torch.float32
    full = minti.load("toy")
    for name, tensor in sd.unet.state_dict().items():
        assert torch.equal(tensor, full.unet.state_dict()[name].to(torch.bfloat16)), name
    with pytest.raises(ValueError, match="unknown components"):
        minti.load("toy", dtype={"unte": torch.float16})


def test_fp16_gradient_norms_get_a_loss_scale(monkeypatch):
    def context_grad_norms(*args):  # the mse reading of timesteps.g_readings
        return g_readings(*args, projections=0)["mse"]

    """A UNet whose output barely depends on the context: gradients of ~1e-7, in fp16's subnormal range."""
    torch.manual_seed(0)
    unet = UNet(UNET).eval().requires_grad_(False)
    with torch.no_grad():
        unet.conv_out.weight.mul_(1e-4)
    half = UNet(UNET).eval().requires_grad_(False)
    half.load_state_dict(unet.state_dict())
    half.half()
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    context, t = torch.randn(2, 10, 24), torch.tensor([20, 700])
    fp32 = context_grad_norms(unet, DDPM(), latents, context, t, noise)
    assert fp32.max() < 1e-6
    fp16 = context_grad_norms(half, DDPM(), latents, context.half(), t, noise)
    # measured: 6.1e-4 (over 6 seeds: 5e-4 to 2.2e-3)
    torch.testing.assert_close(fp16, fp32, rtol=1.5e-3, atol=0)
    monkeypatch.setattr(timesteps, "FP16_LOSS_SCALE", 1.0)  # without the scale: tens of percent off
    assert not torch.allclose(context_grad_norms(half, DDPM(), latents, context.half(), t, noise), fp32,
                              rtol=0.1, atol=0)


def test_sample_py_warns_about_non_finite_images(capsys):
    from types import SimpleNamespace

    from minti.run import cli

    table = SimpleNamespace(weight=torch.ones(5, 4))  # what the advice reads: the typical word's norm
    sd = SimpleNamespace(text_encoder=SimpleNamespace(text_model=SimpleNamespace(
        embeddings=SimpleNamespace(token_embedding=table))))
    images = torch.zeros(3, 3, 4, 4)
    cli.warn_if_not_finite(images, "fp16", sd)  # what sample.py calls on its images
    assert capsys.readouterr().err == ""
    images[1, 0, 0, 0] = float("nan")
    cli.warn_if_not_finite(images, "fp16", sd)
    err = capsys.readouterr().err
    assert "image(s) [1] of 3 hold NaN/Inf" in err and "--precision fp32" in err
