"""tests/benchmarks/bench_gpu.py cannot rot, and measures what it says: its --tiny run (tiny models, the same
code as the GPU run) completes on a CPU and writes every row of its table with finite numbers in the planned
order; minti's rows ran train.py's own step (ti.adamw, train.py's GradScaler in fp16, train_loop, the data
path of data.load_concept_data); the useful FLOPs per image are the same count on both sides and MFU divides
them (not what a side happened to run) by the row's own precision's peak; a budget of 0 s writes every row as
skipped, in order. Without CUDA, the full run refuses with a clear message and exit code 2.
"""
import csv
import importlib.util
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
RTOL = 1e-5  # the CSV keeps 6 significant digits

# Per section, the columns every row must fill with a finite number (others may stay empty).
REQUIRED = {
    "train": ["batch", "px", "time_ms", "time_min_ms", "model_mib", "useful_tflop", "run_tflop", "tflops",
              "peak_tflops", "mfu"],
    "sample": ["time_ms"],
    "multires": ["px"],
    "check": ["value"],
    "memory": ["value"],
}
NUMERIC = ["batch", "px", "checkpointing", "channels_last", "time_ms", "time_min_ms", "peak_mib", "reserved_mib",
           "work_mib", "model_mib", "useful_tflop", "run_tflop", "tflops", "peak_tflops", "mfu", "time_ratio",
           "mem_ratio", "value"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def tiny_setup():
    return bench.Setup(device=torch.device("cpu"), tiny=True, **bench.TINY)


def expected_train_cases():
    """The tiny plan written out by hand (batches 1 and 2, big batch 4), in the order it must run."""
    cases = []
    for precision, batches, ckpts, suffix in (("bf16", (1, 2), (False, True), ""), ("fp16", (1, 2), (False, True), ""),
                                              ("bf16", (1, 2), (False,), " channels_last"),
                                              ("bf16", (4,), (False, True), ""), ("fp32", (1, 2), (False,), ""),
                                              ("tf32", (1, 2), (False,), "")):
        for side in ("recipe", "minti"):
            cases += [f"{side} {precision} b{b}{' ckpt' * ckpt}{suffix}" for b, ckpt in itertools.product(batches, ckpts)]
    return cases


def expected_cases():
    sample = {f"{side} {p} 10 DDIM steps" for side in ("minti", "diffusers") for p in ("fp32", "fp16")}
    multires = {"plain word fp16", "multires word fp16", "equal buckets = plain word"}
    checks = {"fp16 GradScaler step", "word gradient bf16 vs fp32", "word gradient fp16 vs fp32",
              "word gradient fp16 vs bf16"}  # host-device syncs: CUDA only
    memory = {"after loading", "after caching 8 images", "after one fp16 + checkpointing step",
              "after a 4-image preview"}
    return set(expected_train_cases()) | sample | multires | checks | memory


def run_bench(path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--csv", str(path),
                          "--peak-tflops", "1", *extra], capture_output=True, text=True, timeout=HUNG_S, env=env)
    assert out.returncode == 0, f"bench_gpu --tiny failed ({out.returncode}):\n{out.stdout[-3000:]}\n" \
                                f"{out.stderr[-3000:]}"
    with open(path, newline="") as f:
        return out.stdout, list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    said, rows = run_bench(tmp_path_factory.mktemp("bench") / "tiny.csv")
    assert "every check passed" in said and "0 skipped by the budget" in said
    return rows


def train(rows, side=None, **match):
    return [r for r in rows if r["section"] == "train" and (side is None or r["side"] == side)
            and all(r[k] == str(v) for k, v in match.items())]


def test_tiny_run_writes_every_row_in_order(tiny_rows):
    cases = [r["case"] for r in tiny_rows]
    assert len(cases) == len(set(cases)), "a case appears twice"
    assert set(cases) == expected_cases()
    assert [r["case"] for r in train(tiny_rows)] == expected_train_cases()  # the main table first


def test_tiny_numbers_are_finite(tiny_rows):
    for r in tiny_rows:
        for column in REQUIRED[r["section"]]:
            assert r[column] != "", f"{r['case']}: {column} is empty"
        for column in NUMERIC:
            if r[column] != "":
                assert math.isfinite(float(r[column])), f"{r['case']}: {column} = {r[column]}"
        if r["section"] == "train" and r["side"] == "minti":
            assert r["time_ratio"] != "", f"{r['case']}: no ratio to the recipe"
            assert (r["mem_ratio"] != "") == (r["peak_mib"] != ""), r["case"]  # (Linux may refuse a peak reset)
        if r["section"] in ("train", "sample", "multires") and r["time_ms"]:
            assert float(r["time_ms"]) > 0


def test_both_sides_count_the_same_useful_flops_and_mfu_divides_them(tiny_rows):
    """useful_tflop, counted on each side's own modules, is the same per image on both sides and at every batch;
    minti's step runs exactly that (cached latents, no recompute), the recipe's more (its VAE encode), and
    checkpointing more again (its recomputation); MFU = useful / time / the row's peak, for every row."""
    per_image = {r["side"]: float(r["useful_tflop"]) / int(r["batch"]) for r in train(tiny_rows)}
    reference = per_image["minti"]
    for r in train(tiny_rows):
        useful, ran = float(r["useful_tflop"]), float(r["run_tflop"])
        assert useful / int(r["batch"]) == pytest.approx(reference, rel=RTOL), r["case"]
        if r["side"] == "minti" and r["checkpointing"] == "0":
            assert ran == pytest.approx(useful, rel=RTOL), r["case"]
        else:
            assert ran > useful * 1.05, r["case"]  # the recipe's VAE encode; checkpointing's recompute
        mfu = useful / (float(r["time_ms"]) / 1e3) / float(r["peak_tflops"])
        assert float(r["mfu"]) == pytest.approx(mfu, rel=1e-4), r["case"]
    for side in ("minti", "recipe"):  # checkpointing recomputes, it computes nothing less
        for b in (1, 2):
            plain, ckpt = (train(tiny_rows, side, precision="bf16", batch=b, checkpointing=c, channels_last=0)
                           for c in (0, 1))
            assert float(ckpt[0]["run_tflop"]) > float(plain[0]["run_tflop"])


def test_minti_rows_name_train_py_optimizer_and_scaler(tiny_rows):
    """The CSV says which optimizer each row stepped: minti's, ti.adamw's on the word's one vector (with
    train.py's GradScaler in fp16 alone); the recipe's, AdamW over the whole token table."""
    from minti import textual_inversion as ti

    word = ti.LearnedWord(torch.zeros(1, 32), [49408])
    expected = bench.describe_optimizer(ti.adamw(word, bench.LR, bench.WEIGHT_DECAY))
    assert expected == "AdamW fused=False, 1 tensor(s) of 32 values"  # the CPU: fused AdamW is CUDA's
    for r in train(tiny_rows, "minti"):
        assert r["optimizer"] == expected + ", GradScaler" * (r["precision"] == "fp16"), r["case"]
    for r in train(tiny_rows, "recipe"):
        assert r["optimizer"].startswith("AdamW fused=False, 1 tensor(s) of 1581088 values"), r["case"]  # 49409 x 32


def test_tiny_checks_pass(tiny_rows):
    failed = [(r["case"], r["value"], r["note"]) for r in tiny_rows if r["ok"] == "False"]
    assert not failed
    judged = {r["case"] for r in tiny_rows if r["ok"] == "True"}
    for case in ("minti fp32 10 DDIM steps", "minti fp16 10 DDIM steps", "equal buckets = plain word",
                 "fp16 GradScaler step", "word gradient fp16 vs fp32"):
        assert case in judged, f"{case} was not judged"
    value = {r["case"]: r for r in tiny_rows}
    for precision in ("fp32", "fp16"):  # mean uint8 difference from diffusers' image: measured 0 (max 0) on both
        assert float(value[f"minti {precision} 10 DDIM steps"]["value"]) <= 0.5
    # The word's gradient across precisions on the tiny model, at about 3x what was measured on the CPU (fp16 vs
    # fp32 2.0e-3, bf16 vs fp32 1.7e-2, fp16 vs bf16 1.8e-2); the script's own GRAD_TOLERANCE is SD 1.5's guess.
    for pair, tolerance in (("fp16 vs fp32", 6e-3), ("bf16 vs fp32", 5e-2), ("fp16 vs bf16", 5e-2)):
        assert float(value[f"word gradient {pair}"]["value"]) <= tolerance, pair
    scaler = value["fp16 GradScaler step"]  # one step taken at GradScaler's first scale, none skipped
    assert float(scaler["value"]) == 2.0 ** 16 and "vectors updated" in scaler["note"]


@pytest.mark.usefixtures("one_thread")
def test_minti_step_is_train_py_step(monkeypatch, tmp_path):
    """In process, on the tiny model: the minti side's step is made by ti.adamw (the very optimizer it
    steps), takes each step through ti.train_loop -> ti.train_step with that optimizer and, in fp16, a
    torch.amp.GradScaler (train.py's), on data read by data.load_concept_data with cached latents."""
    from minti import data as minti_data
    from minti import textual_inversion as ti

    made, stepped = [], []
    real_adamw, real_step = ti.adamw, ti.train_step

    def adamw(*args, **kwargs):
        made.append(real_adamw(*args, **kwargs))
        return made[-1]

    def train_step(*args, **kwargs):
        stepped.append((args[4], kwargs.get("scaler", args[7] if len(args) > 7 else None)))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ti, "adamw", adamw)
    monkeypatch.setattr(ti, "train_step", train_step)
    setup = tiny_setup()
    masters = bench.build_masters(setup, str(tmp_path))
    models = bench.place_side(masters, setup, bench.Case("minti", "fp16", 1))
    assert isinstance(models.data, minti_data.ConceptData) and models.data.latents.mean is not None
    assert models.sd.vae is None  # freed after caching, as train.py does without previews
    step = bench.minti_step(models, setup, 1)
    assert made == [step.optimizer] and isinstance(step.scaler, torch.amp.GradScaler)
    assert math.isfinite(step()) and math.isfinite(step())
    assert stepped == [(step.optimizer, step.scaler)] * 2


def test_peaks_are_per_precision(monkeypatch):
    """MFU's peak is the row's precision's: an H100 SXM's fp32 rows divide by 67 TFLOPS (plain FP32), its tf32
    rows by 494.5 (TF32 tensor cores), bf16 and fp16 by 989; an H100 PCIe's are its own."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peaks, _ = bench.device_peaks(torch.device("cuda"), None)
    assert peaks == {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert bench.device_peaks(torch.device("cuda"), None)[0]["fp32"] == 51.0


def test_a_budget_skips_rows_and_writes_each_in_order(tmp_path):
    """--budget-s 0: nothing fits, every row is written as SKIPPED, still in the planned order."""
    said, rows = run_bench(tmp_path / "none.csv", "--budget-s", "0")
    assert [r["case"] for r in train(rows)] == expected_train_cases()
    assert all(r["note"] == "SKIPPED: --budget-s" and r["time_ms"] == "" for r in rows)
    assert "every check passed" in said


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script would run the full benchmark")
def test_full_run_without_cuda_refuses():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=HUNG_S)
    assert out.returncode == 2
    assert "--tiny --device cpu" in out.stdout
