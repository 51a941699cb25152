"""The GPU paths, run on a GPU: `python -m pytest -m cuda` (every other run hides the GPUs, and these tests
skip there, saying why; see tests/conftest.py).

- train.py itself, on the toy model: fp16 weights with its GradScaler and fused AdamW; bf16 with gradient
  checkpointing and channels_last; P+ and NeTI words in fp16 and bf16; torchrun with one process per
  GPU (where there are two or more). Each half-precision run's first loss (the same batch, timesteps and
  noise: the generator is on the CPU) is the fp32 run's, to that precision's rounding.
- sample.py at 512 px in fp16 (its default on CUDA), on the toy model and on a random-weight model of SD
  1.5's architecture: no NaN/Inf (saved as black pixels); the toy's fp16 images are its fp32 images.

Written on a machine without a GPU: the tolerances were measured there, the same runs with the CPU's
fp16 / bf16 kernels; CUDA's kernels round differently, so a failure here is first a number to read, then
perhaps a bug.
"""
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import minti.unet
from minti.unet import UNet

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
HUNG_S = 1800  # a guard against a hung subprocess, never a speed requirement
# |first loss - the fp32 run's| / the fp32 run's, at about 3x the worst measured on the CPU (TI, P+, NeTI):
# fp16 1.4e-4, 1.4e-4, 9.3e-5; bf16 4.8e-4, 4.8e-4, 1.7e-3
LOSS_TOLERANCE = {"fp16": 5e-4, "bf16": 5e-3}
# mean |uint8 difference| of sample.py's fp16 and fp32 images of the toy: measured 0.14 at 128 px on the CPU
# (512 px in fp16 there takes over half an hour); a NaN image is black, about 115 levels off (measured mean)
IMAGE_TOLERANCE = 1.0


@pytest.fixture(scope="module")
def train_py():
    """train.py's main, run in this process on the toy model and the GPU (a few steps, no previews); its
    exit code. In this process, so that a test can watch the UNet it trains through."""
    spec = importlib.util.spec_from_file_location("minti_train_script", ROOT / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(out, *flags):
        argv = ["--model", "toy", "--device", "cuda", "--steps", STEPS, "--batch", 4, "--save-every", 2,
                "--preview-every", 0, "--no-evaluate", "--out", out, *flags]
        return script.main([str(a) for a in argv])
    return run


def losses(out):
    with open(out / "log.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def state(out):
    return torch.load(out / "checkpoint" / "state.pt", weights_only=True)


@pytest.fixture
def unet_calls(monkeypatch):
    """What each call of a UNet ran with: its weights' dtype and device, their memory layout, and how many
    of its stages went through torch.utils.checkpoint."""
    calls, forward, checkpoint = [], UNet.forward, minti.unet.checkpoint

    def counted_checkpoint(*args, **kwargs):
        calls[-1]["checkpointed"] += 1
        return checkpoint(*args, **kwargs)

    def recorded_forward(self, *args, **kwargs):
        w = self.conv_in.weight
        nhwc = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        calls.append({"dtype": w.dtype, "device": w.device.type, "channels_last": nhwc, "checkpointed": 0})
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(UNet, "forward", recorded_forward)
    monkeypatch.setattr(minti.unet, "checkpoint", counted_checkpoint)
    return calls


@pytest.fixture(scope="module")
def fp32_run(train_py, tmp_path_factory):
    """fp32_run(kind): the same run in fp32 on the GPU, once per kind of word ("ti", "per-layer", "neti"),
    what the half-precision runs are compared with. Call it before watching the UNet (unet_calls)."""
    done = {}

    def run(kind):
        if kind not in done:
            out = tmp_path_factory.mktemp(f"fp32-{kind}") / "run"
            assert train_py(out, *word_flags(kind), "--precision", "fp32") == 0
            done[kind] = out
        return done[kind]
    return run


def word_flags(kind):
    return [] if kind == "ti" else [f"--{kind}"]


def assert_first_loss_close(out, reference, precision):
    """Every step's loss finite; the first step's (the same batch, timesteps and noise) the fp32 run's."""
    ours, theirs = losses(out), losses(reference)
    assert len(ours) == STEPS and all(np.isfinite(ours)), ours
    assert abs(ours[0] - theirs[0]) <= LOSS_TOLERANCE[precision] * theirs[0], (ours[0], theirs[0])


def assert_changed(out, name):
    """The word's file at the end differs from its step-2 snapshot: the steps moved it."""
    end, middle = load_file(out / name), load_file(out / "snapshots" / "step-000002" / name)
    assert end.keys() == middle.keys()
    for key, tensor in end.items():  # the vectors, or NeTI's network: fp32, finite
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), key
    assert any(not torch.equal(end[k], middle[k]) for k in end), f"{name} did not change from step 2 to 4"


def test_fp16_trains_with_the_gradscaler_and_fused_adamw(train_py, fp32_run, tmp_path, unet_calls):
    reference = fp32_run("ti")
    unet_calls.clear()
    out = tmp_path / "run"
    assert train_py(out, "--precision", "fp16") == 0
    assert unet_calls and all(c["dtype"] == torch.float16 and c["device"] == "cuda" for c in unet_calls)
    s = state(out)
    assert s["optimizer"]["param_groups"][0]["fused"] is True  # one kernel, which skips itself on overflow
    # the loss scale still 2^16, and grown towards its next doubling at every step: no step was skipped
    # (measured on the CPU: the same)
    assert s["scaler"]["scale"] == 2.0 ** 16 and s["scaler"]["_growth_tracker"] == STEPS, s["scaler"]
    assert s["vectors"].dtype == torch.float32 and torch.isfinite(s["vectors"]).all()
    assert_changed(out, "learned_embeds.safetensors")
    assert_first_loss_close(out, reference, "fp16")


def test_bf16_trains_with_checkpointing_and_channels_last(train_py, fp32_run, tmp_path, unet_calls):
    reference = fp32_run("ti")
    unet_calls.clear()
    out = tmp_path / "run"
    assert train_py(out, "--precision", "bf16", "--checkpointing", "--channels-last") == 0
    assert unet_calls
    for call in unet_calls:  # every step's UNet: bf16 weights, NHWC, its stages recomputed in backward
        assert call["dtype"] == torch.bfloat16 and call["device"] == "cuda" and call["channels_last"], call
        assert call["checkpointed"] > 0, call
    s = state(out)
    assert s["scaler"] is None and s["vectors"].dtype == torch.float32 and torch.isfinite(s["vectors"]).all()
    assert_changed(out, "learned_embeds.safetensors")
    assert_first_loss_close(out, reference, "bf16")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["per-layer", "neti"])
def test_p_plus_and_neti_train_in_half_precision(train_py, fp32_run, tmp_path, unet_calls, kind, precision):
    reference = fp32_run(kind)
    unet_calls.clear()
    out = tmp_path / "run"
    assert train_py(out, *word_flags(kind), "--precision", precision) == 0
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert unet_calls and all(c["dtype"] == dtype and c["device"] == "cuda" for c in unet_calls)
    (word_file,) = out.glob(f"*-{kind}.safetensors")
    assert_changed(out, word_file.name)
    if precision == "fp16":  # no step skipped by the loss scale (measured on the CPU: the same)
        assert state(out)["scaler"]["_growth_tracker"] == STEPS, state(out)["scaler"]
    assert_first_loss_close(out, reference, precision)


def test_torchrun_with_one_process_per_gpu(tmp_path):
    """README's torchrun command: N processes (nccl, one GPU each) take the steps that one process takes."""
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip(f"needs two GPUs or more for one process per GPU (found {n})")
    flags = ["train.py", "--model", "toy", "--device", "cuda", "--steps", STEPS, "--batch", 2 * n,
             "--save-every", 0, "--preview-every", 0, "--no-evaluate", "--precision", "fp32"]
    one = subprocess.run([sys.executable, *map(str, flags), "--out", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True, timeout=HUNG_S)
    assert one.returncode == 0, one.stderr[-3000:]
    many = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(n), *map(str, flags), "--out", str(tmp_path / "many")], cwd=ROOT,
                          capture_output=True, text=True, timeout=HUNG_S)
    assert many.returncode == 0, many.stderr[-3000:]
    assert json.loads((tmp_path / "many" / "config.json").read_text())["processes"] == n
    # fp32 (TF32 off): the same sums in another order. 1e-5 on 2 CPU processes (tests/test_distributed.py);
    # 1e-4 here, where cuDNN may choose other kernels for the smaller per-process batch.
    assert losses(tmp_path / "many") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def sample_py(out, *flags):
    """sample.py at 512 px on the GPU, a PNG per image in `out`; (the images [N, H, W, 3], its stderr)."""
    argv = [sys.executable, "sample.py", "--device", "cuda", "--width", "512", "--height", "512",
            "--steps", "10", "--no-progress", "--out", str(out), *map(str, flags)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=HUNG_S)
    assert result.returncode == 0, result.stderr[-3000:]
    images = np.stack([np.asarray(Image.open(p)) for p in sorted(Path(out).glob("*.png"))])
    assert images.shape[1:] == (512, 512, 3)
    return images.astype(np.float32), result.stderr


def test_sample_py_fp16_at_512_px_on_the_toy_gives_its_fp32_images(tmp_path):
    fp16, err = sample_py(tmp_path / "fp16", "--model", "toy", "--n", 2, "--precision", "fp16")
    assert "NaN/Inf" not in err, err  # sample.py's warning: black pixels
    fp32, _ = sample_py(tmp_path / "fp32", "--model", "toy", "--n", 2, "--precision", "fp32")
    # the default prompt's blue background, not black (measured in fp32: a mean of 115 of 255)
    assert (fp16.reshape(len(fp16), -1).mean(1) > 40).all()
    difference = np.abs(fp16 - fp32).mean()
    assert difference < IMAGE_TOLERANCE, difference


@pytest.fixture(scope="module")
def random_sd15(tmp_path_factory, clip_bpe_path):
    """SD 1.5's architecture (CLIP ViT-L/14, the 860M UNet, the VAE) with PyTorch's random initial
    weights, written in fp16 as a diffusers folder (about 2 GB)."""
    from minti.clip import CLIPTextConfig, CLIPTextModel
    from minti.io.tokenizer_files import read_clip_bpe
    from minti.io.weights import StableDiffusion, save_diffusers_folder
    from minti.schedulers import DDPM
    from minti.unet import UNetConfig
    from minti.vae import VAE, VAEConfig

    torch.manual_seed(0)
    sd = StableDiffusion(read_clip_bpe(clip_bpe_path), CLIPTextModel(CLIPTextConfig()).half(),
                         UNet(UNetConfig()).half(), VAE(VAEConfig()).half(), DDPM())
    folder = tmp_path_factory.mktemp("sd15") / "random-sd15"
    save_diffusers_folder(sd, folder)
    return folder


def test_sample_py_fp16_at_512_px_on_sd15_architecture_gives_no_nan(random_sd15, tmp_path):
    images, err = sample_py(tmp_path / "out", "--model", random_sd15, "--n", 2, "--precision", "fp16")
    assert "NaN/Inf" not in err, err
    assert (images.reshape(len(images), -1).max(1) > 0).all()  # not all black


def test_bench_gpu_tiny_runs_the_cuda_paths(tmp_path):
    """tests/benchmarks/bench_gpu.py --tiny on the GPU: the CUDA paths of the benchmark itself (fused AdamW in
    minti's rows, CUDA's GradScaler, the reserved peak, the host-device sync counts) run to the end, each check
    passes, and both sides' useful FLOPs per image are equal (as test_bench_gpu checks on the CPU)."""
    path = tmp_path / "tiny_cuda.csv"
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "benchmarks" / "bench_gpu.py"), "--tiny", "--device",
                           "cuda", "--peak-tflops", "1", "--csv", str(path)], capture_output=True, text=True,
                          timeout=HUNG_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["section"] == "train"]
    assert train and all(r["ok"] == "True" and r["reserved_mib"] != "" for r in train)
    for r in train:
        if r["side"] == "minti":
            assert r["optimizer"].startswith("AdamW fused=True, 1 tensor(s)"), r["case"]
            assert r["optimizer"].endswith(", GradScaler") == (r["precision"] == "fp16"), r["case"]
    per_image = {float(r["useful_tflop"]) / int(r["batch"]) for r in train}
    assert max(per_image) == pytest.approx(min(per_image), rel=1e-5)
    assert {"host-device syncs: 3 train steps"} <= {r["case"] for r in rows}
