"""Devices and precision by name, for the scripts: "auto" picks the accelerator, "fp16" is a dtype, and
minti's choice of NVIDIA back-end settings.
"""
import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name="auto") -> torch.device:
    """"auto": cuda if available, else mps (Apple), else cpu; otherwise the device named."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose_cuda_backends() -> None:
    """minti's choice for NVIDIA GPUs, made by train.py and sample.py: fp32 means IEEE fp32, so TF32 is OFF
    for matrix products and convolutions (PyTorch leaves it on for convolutions); the fast choices are
    --precision bf16 / fp16, which run tensor cores in those types. cudnn.benchmark stays off: the same
    convolution algorithms in every process, so a resumed run repeats an uninterrupted one."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
