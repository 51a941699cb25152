"""tests/benchmarks/bench_gpu.py cannot rot: its --tiny run (tiny models, the same code as the GPU run)
completes on a CPU, writes every row of its table with finite numbers, and its agreement checks pass
(minti's images = diffusers', a multires word with equal buckets = the plain word, GradScaler step, word
gradients across precisions). Without CUDA, the full run refuses with a clear message and exit code 2.
"""
import csv
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "benchmarks" / "bench_gpu.py"
HUNG_S = 3600  # only a guard against a hung run, never a speed requirement (the benchmark measures speed)
PRECISIONS = ("fp32", "fp16", "bf16")

# Per section, the columns every row must fill with a finite number (others may stay empty).
REQUIRED = {
    "train": ["batch", "px", "time_ms", "time_min_ms", "model_mib", "tflop", "tflops", "mfu"],
    "sample": ["time_ms", "model_mib"],
    "multires": ["px"],
    "check": ["value"],
    "memory": ["value"],
}
NUMERIC = ["batch", "px", "checkpointing", "time_ms", "time_min_ms", "peak_mib", "work_mib", "model_mib",
           "tflop", "tflops", "mfu", "time_ratio", "mem_ratio", "value"]


def expected_cases():
    train = {f"{side} {p} b{b}{' ckpt' * ckpt}" for p, b, ckpt, side in
             itertools.product(PRECISIONS, (1, 2), (False, True), ("recipe", "minti"))}
    sample = {f"{side} {p} 10 DDIM steps" for side in ("minti", "diffusers") for p in ("fp32", "fp16")}
    multires = {"plain word fp16", "multires word fp16", "equal buckets = plain word"}
    checks = {"fp16 GradScaler step", "word gradient bf16 vs fp32", "word gradient fp16 vs fp32",
              "word gradient fp16 vs bf16"}  # host-device syncs: CUDA only
    memory = {"after loading", "after caching 8 images", "after one fp16 + checkpointing step",
              "after a 4-image preview"}
    return train | sample | multires | checks | memory


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--csv", str(path),
                          "--peak-tflops", "1"], capture_output=True, text=True, timeout=HUNG_S, env=env)
    assert out.returncode == 0, f"bench_gpu --tiny failed ({out.returncode}):\n{out.stdout[-3000:]}\n" \
                                f"{out.stderr[-3000:]}"
    assert "every check passed" in out.stdout
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_every_row(tiny_rows):
    cases = [r["case"] for r in tiny_rows]
    assert len(cases) == len(set(cases)), "a case appears twice"
    assert set(cases) == expected_cases()


def test_tiny_numbers_are_finite(tiny_rows):
    for r in tiny_rows:
        for column in REQUIRED[r["section"]]:
            assert r[column] != "", f"{r['case']}: {column} is empty"
        for column in NUMERIC:
            if r[column] != "":
                assert math.isfinite(float(r[column])), f"{r['case']}: {column} = {r[column]}"
        if r["section"] == "train" and r["side"] == "minti":
            assert r["time_ratio"] != "", f"{r['case']}: no ratio to the recipe"
        if r["section"] in ("train", "sample", "multires") and r["time_ms"]:
            assert float(r["time_ms"]) > 0


def test_tiny_checks_pass(tiny_rows):
    failed = [(r["case"], r["value"], r["note"]) for r in tiny_rows if r["ok"] == "False"]
    assert not failed
    judged = {r["case"] for r in tiny_rows if r["ok"] == "True"}
    for case in ("minti fp32 10 DDIM steps", "minti fp16 10 DDIM steps", "equal buckets = plain word",
                 "fp16 GradScaler step", "word gradient fp16 vs fp32"):
        assert case in judged, f"{case} was not judged"
    fp32 = next(r for r in tiny_rows if r["case"] == "minti fp32 10 DDIM steps")
    assert float(fp32["value"]) <= 1.0  # mean uint8 difference from diffusers' image


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script would run the full benchmark")
def test_full_run_without_cuda_refuses():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=HUNG_S)
    assert out.returncode == 2
    assert "--tiny --device cpu" in out.stdout
