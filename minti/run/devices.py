"""Devices and precision by name, for the scripts: "auto" picks the accelerator, "fp16" is a dtype, and
minti's choice of NVIDIA back-end settings.
"""
import os

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


def auto_precision(device: torch.device) -> str:
    """--precision auto: bf16 on a GPU that has it (no loss scale needed), fp16 (with train.py's loss scale)
    on one that does not, fp32 on the CPU and elsewhere."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def choose_cuda_backends(tf32: bool = False, deterministic: bool = False) -> None:
    """minti's choice for NVIDIA GPUs, made by train.py and sample.py: fp32 means IEEE fp32 unless --tf32, so
    TF32 is off for matrix products and convolutions (PyTorch leaves it on for convolutions); the fast choices
    are --precision bf16 / fp16. cudnn.benchmark stays off: the same convolution algorithms in every process.
    --deterministic: deterministic kernels only (and the cuBLAS workspace they need), so that a resumed run
    repeats an uninterrupted one bit for bit on CUDA too; slower, and an op without such a kernel fails."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
        torch.use_deterministic_algorithms(True)
