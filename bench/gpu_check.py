"""GPU check of the inference engine: one line per check, ``PASS|FAIL|SKIP <name>: <figures>``.

Usage::

    bash bench/gpu_check.sh                 # CUDA checks where CUDA is, the CPU parts anywhere
    bash bench/gpu_check.sh --require-gpu   # no CUDA is a failure
    OUT=dir bash bench/gpu_check.sh         # also writes dir/gpu_check.json

Checks (sizes kept small: the whole run takes a few minutes on one GPU):

* ``agreement-<fp32|fp16|bf16>``: the shipped ``lung-nodule`` model on a
  synthetic chest CT, on CUDA at that precision, against the CPU in fp32:
  max |dp| and Dice of the masks thresholded at 0.5 (thresholds below).
* ``throughput``: model step and end-to-end slices/s through ``ModelPipeline``
  with the batch the engine picked (bench/inference.py's corpus and inputs);
  on a machine without CUDA this runs on the CPU (the CPU part).
* ``feed``: the engine's 2D feed alone (bench/inference.py ``--loader-only``:
  the network swapped for one that does no work) from decoded 512x512 phantom
  volumes, slices/s at the batch the engine picks and at 64; on CUDA it fails
  below 5,000 slices/s (the feed must never be what a GPU waits on); on the
  CPU it is reported only. Beside it, the host side alone (``--loader-only``'s
  meta-device figure), so that a GPU run shows how close that CPU-only
  measurement comes to the real one.
* ``oom-halving``: a network that raises ``torch.cuda.OutOfMemoryError`` above
  a batch size; the engine must halve, give the same output, and keep the
  halved size for the next call.
* ``torchscript-bundle``: a TorchScript MONAI bundle (as tests/support/models.py
  builds them) through the engine on CUDA against the CPU.
* ``3d-stitched``: a small 3D UNet bundle with a memory budget that forces the
  sliding window to stitch its output in host memory, against the CPU.
* ``cuda-tests``: tests/unit/test_engine.py, test_feed.py and test_preprocess.py; fails when
  a test is skipped for want of CUDA while CUDA is there.

Exit status 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import inference as bench  # noqa: E402
from pacsnode.analysis.cnn.engine import EngineOptions, InferenceEngine, VolumeInput, warm_model  # noqa: E402
from pacsnode.analysis.cnn.package import load_package  # noqa: E402
from pacsnode.analysis.cnn.pipeline import ModelParams, ModelPipeline  # noqa: E402

# CUDA against CPU fp32: the largest |dp| allowed, and the least Dice of the masks at 0.5.
AGREEMENT = {"fp32": (5e-3, 0.99), "fp16": (5e-2, 0.95), "bf16": (1e-1, 0.90)}
BUNDLE_MAX_DP = 5e-3  # TorchScript bundle and 3D stitched output, fp32 on CUDA against the CPU
OOM_MOST = 4  # the failing network's largest batch

CUDA = torch.cuda.is_available()
RESULTS: list[dict[str, Any]] = []


def report(status: str, name: str, figures: str, data: dict[str, Any] | None = None) -> None:
    print(f"{status} {name}: {figures}", flush=True)
    RESULTS.append({"status": status, "name": name, "figures": figures, **(data or {})})


def check(name: str, needs_cuda: bool, fn: Callable[[], tuple[bool, str, dict[str, Any]]]) -> None:
    if needs_cuda and not CUDA:
        report("SKIP", name, "no CUDA")
        return
    t0 = time.perf_counter()
    try:
        ok, figures, data = fn()
    except Exception as exc:  # a check that raises fails; the others still run
        report("FAIL", name, f"{type(exc).__name__}: {exc}")
        return
    report("PASS" if ok else "FAIL", name, f"{figures} ({time.perf_counter() - t0:.1f} s)", data)


def _options(**kw: object) -> EngineOptions:
    return EngineOptions(**{"device": "cpu", "precision": "fp32", **kw})  # type: ignore[arg-type]


def _predict(root: str | Path, volume: VolumeInput, **kw: object) -> np.ndarray:
    options = _options(**kw)
    engine = InferenceEngine(warm_model(load_package(root), options), options)
    return engine.predict([volume])[0].astype(np.float32)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


# --- checks ---------------------------------------------------------------------------------------------


def agreement() -> None:
    from pacsnode.analysis.modeldev.synthetic import PhantomSpec, make_chest_phantom

    if not CUDA:
        for precision in AGREEMENT:
            report("SKIP", f"agreement-{precision}", "no CUDA")
        return
    phantom = make_chest_phantom(PhantomSpec(slices=32, size=512, slice_thickness_mm=2.5, nodules=6), seed=3)
    volume = VolumeInput(image=phantom.hu, spacing=phantom.spacing)
    reference = _predict("lung-nodule", volume, batch_size=8)
    for precision, (max_dp, min_dice) in AGREEMENT.items():

        def run(precision: str = precision, max_dp: float = max_dp, min_dice: float = min_dice) -> Any:
            out = _predict("lung-nodule", volume, device="cuda", precision=precision, batch_size="auto")
            dp = float(np.abs(out - reference).max())
            dice = _dice(out > 0.5, reference > 0.5)
            figures = f"max|dp| {dp:.2e} (<= {max_dp:g}), Dice {dice:.4f} (>= {min_dice})"
            return dp <= max_dp and dice >= min_dice, figures, {"max_dp": dp, "dice": dice}

        check(f"agreement-{precision}", True, run)


def throughput() -> tuple[bool, str, dict[str, Any]]:
    studies, slices = (2, 120) if CUDA else (1, 40)
    params = ModelParams(model="lung-nodule", engine={"device": "cuda" if CUDA else "cpu"})
    with tempfile.TemporaryDirectory(prefix="pacsnode-gpu-check-") as tmp:
        truths = bench._write_corpus(Path(tmp), studies, slices)
        bench.run_engine(truths[:1], params)  # warm-up: model loaded, batch size measured
        outputs = ModelPipeline().run_many(bench._inputs(truths), params)
        for out in outputs:
            if isinstance(out, Exception):
                raise out
        timings = outputs[0].summary["timings"]  # type: ignore[union-attr]
        stats = bench.run_engine(truths, params)
    n = studies * slices
    data = {
        "device": "cuda" if CUDA else "cpu",
        "batch_size": int(timings["engine_batch_size"]),
        "model_slices_per_s": n / stats["model_s"],
        "end_to_end_slices_per_s": n / stats["total_s"],
    }
    figures = (
        f"{data['device']}, batch {data['batch_size']}: model step {data['model_slices_per_s']:.0f} slices/s, "
        f"end to end {data['end_to_end_slices_per_s']:.0f} slices/s "
        f"({data['end_to_end_slices_per_s'] / data['model_slices_per_s']:.0%} of it; {n} slices)"
    )
    return True, figures, data


def feed() -> tuple[bool, str, dict[str, Any]]:
    from pacsnode.analysis.modeldev.synthetic import PhantomSpec, make_chest_phantom

    studies, slices = (2, 120) if CUDA else (1, 40)
    device = "cuda" if CUDA else "cpu"
    volumes = []
    for n in range(studies):
        phantom = make_chest_phantom(PhantomSpec(slices=slices, size=512, nodules=4), seed=100 + n)
        volumes.append(VolumeInput(image=phantom.hu, spacing=phantom.spacing))
    picked, batch = bench.measure_feed(ModelParams(model="lung-nodule", engine={"device": device}), volumes, 3)
    at_64, _ = bench.measure_feed(
        ModelParams(model="lung-nodule", engine={"device": device, "batch_size": 64}), volumes, 3
    )
    host, host_batch = bench.measure_host_side(ModelParams(model="lung-nodule", engine={"device": device}), volumes, 5)
    data = {
        "device": device,
        "batch_size": batch,
        "slices_per_s": picked,
        "slices_per_s_batch_64": at_64,
        "host_side_slices_per_s": host,
        "host_side_batch_size": host_batch,
    }
    ok = not CUDA or min(picked, at_64) >= bench.LOADER_TARGET
    figures = (
        f"{device}: {picked:.0f} slices/s at batch {batch}, {at_64:.0f} at batch 64 "
        f"(target on CUDA >= {bench.LOADER_TARGET:.0f}; {studies * slices} slices of 512x512); "
        f"host side alone (meta device) {host:.0f} slices/s at batch {host_batch}"
    )
    return ok, figures, data


class _RunsOutOfMemory(torch.nn.Module):
    """The network, failing as CUDA does on a batch larger than ``most``; records each batch size."""

    def __init__(self, net: torch.nn.Module, most: int) -> None:
        super().__init__()
        self.net = net
        self.most = most
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        failed = x.shape[0] > self.most
        self.calls.append((int(x.shape[0]), failed))
        if failed:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (forced)")
        out: torch.Tensor = self.net(x)
        return out


def oom_halving() -> tuple[bool, str, dict[str, Any]]:
    rng = np.random.default_rng(5)
    volume = VolumeInput(
        image=rng.normal(-300.0, 400.0, (40, 128, 128)).astype(np.int16), spacing=(2.0, 0.78125, 0.78125)
    )
    options = _options(device="cuda", batch_size=16)
    expected = _predict("lung-nodule", volume, device="cuda", batch_size=16)
    base = warm_model(load_package("lung-nodule"), options)
    module = _RunsOutOfMemory(base.module, OOM_MOST)
    warm = dataclasses.replace(base, module=module, per_item_bytes={}, cpu_batch={}, oom_batch={})
    engine = InferenceEngine(warm, options)
    out = engine.predict([volume])[0].astype(np.float32)
    first = list(module.calls)
    module.calls.clear()
    engine.predict([volume])
    second = list(module.calls)
    dp = float(np.abs(out - expected).max())
    failures = sum(failed for _, failed in first)
    last = max((i for i, (_, failed) in enumerate(first) if failed), default=len(first))
    after = [size for size, _ in first[last + 1 :]]  # from the last out-of-memory error on
    ok = (
        failures >= 1
        and all(size <= OOM_MOST for size in after)
        and all(size <= OOM_MOST and not failed for size, failed in second)
        and dp <= 1e-3
    )
    figures = (
        f"batches {first[:6]}..., {failures} out-of-memory, then at most {max(after, default=0)} "
        f"(limit {OOM_MOST}); next call {sorted({s for s, _ in second})}; max|dp| {dp:.1e}"
    )
    return ok, figures, {"first_call": first, "second_call": second, "max_dp": dp}


def _volume_3d() -> VolumeInput:
    rng = np.random.default_rng(9)
    return VolumeInput(image=rng.normal(-500.0, 350.0, (20, 40, 40)).astype(np.int16), spacing=(1.0, 1.0, 1.0))


def torchscript_bundle() -> tuple[bool, str, dict[str, Any]]:
    from tests.support.models import make_bundle

    with tempfile.TemporaryDirectory(prefix="pacsnode-gpu-check-") as tmp:
        root = make_bundle(Path(tmp) / "bundle", torchscript=True)
        reference = _predict(root, _volume_3d(), batch_size=4)
        out = _predict(root, _volume_3d(), device="cuda", batch_size=4)
    dp = float(np.abs(out - reference).max())
    return dp <= BUNDLE_MAX_DP, f"3D TorchScript bundle, fp32: max|dp| {dp:.1e} (<= {BUNDLE_MAX_DP:g})", {"max_dp": dp}


def stitched_3d() -> tuple[bool, str, dict[str, Any]]:
    import monai.inferers.utils as inferers

    from tests.support.models import make_bundle

    real = inferers.sliding_window_inference
    stitched: list[str] = []

    def recording(*args: Any, device: Any = None, **kwargs: Any) -> Any:
        stitched.append(str(device))
        return real(*args, device=device, **kwargs)

    with tempfile.TemporaryDirectory(prefix="pacsnode-gpu-check-") as tmp:
        root = make_bundle(Path(tmp) / "bundle")
        reference = _predict(root, _volume_3d(), batch_size=4)
        inferers.sliding_window_inference = recording  # type: ignore[assignment]
        try:
            # A budget of 0.1 MB: the output (one 20x40x40 float map per channel) does not fit on the device.
            out = _predict(root, _volume_3d(), device="cuda", memory_budget_mb=0.1)
        finally:
            inferers.sliding_window_inference = real  # type: ignore[assignment]
    dp = float(np.abs(out - reference).max())
    ok = dp <= BUNDLE_MAX_DP and stitched == ["cpu"]
    return ok, f"stitched on {stitched}, max|dp| {dp:.1e} (<= {BUNDLE_MAX_DP:g})", {"max_dp": dp, "stitched": stitched}


def cuda_tests() -> tuple[bool, str, dict[str, Any]]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/unit/test_engine.py",
            "tests/unit/test_feed.py",
            "tests/unit/test_preprocess.py",
            "-q",
            "-rs",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.splitlines()
    skipped = [line for line in lines if line.startswith("SKIPPED")]
    cuda_skipped = [line for line in skipped if "cuda" in line.lower()]
    summary = lines[-1] if lines else proc.stderr.strip()[-200:]
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
    ok = proc.returncode == 0 and not cuda_skipped
    figures = summary + (f"; skipped for want of CUDA: {cuda_skipped}" if cuda_skipped else "")
    return ok, figures, {"returncode": proc.returncode, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--require-gpu", action="store_true", help="no CUDA device is a failure")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if CUDA:
        print(f"CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    else:
        print(f"no CUDA device: running the CPU parts only (torch {torch.__version__})", flush=True)
        if args.require_gpu:
            report("FAIL", "cuda", "no CUDA device and --require-gpu")
    agreement()
    check("throughput", False, throughput)
    check("feed", False, feed)
    check("oom-halving", True, oom_halving)
    check("torchscript-bundle", True, torchscript_bundle)
    check("3d-stitched", True, stitched_3d)
    check("cuda-tests", True, cuda_tests)
    failed = [r["name"] for r in RESULTS if r["status"] == "FAIL"]
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        report_path = Path(out) / "gpu_check.json"
        report_path.write_text(json.dumps({"cuda": CUDA, "torch": torch.__version__, "checks": RESULTS}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
