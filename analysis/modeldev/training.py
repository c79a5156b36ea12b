"""``pacsnode train``: the shipped lung-nodule model, trained on generated chest CT.

The data are synthetic chest CT phantoms (:mod:`pacsnode.analysis.modeldev.synthetic`) with
nodules of varied size (4 to 24 mm), kind (solid, part-solid, ground-glass)
and position (some touching the pleura), vessels as tubes, emphysema, and
per study a random noise level (8 to 30 HU) and in-plane blur (0 to 1 mm),
like different scanners and kernels. Slice thickness varies from 1 to 2.5 mm.

The network is MONAI's ``UNet`` (2D, 3 adjacent slices as channels, sigmoid
output), trained on 128x128 crops with Dice + BCE loss. Everything derives
from one seed, torch runs deterministic algorithms on a fixed number of
threads, so the same seed on the same software gives the same weights.

This is a demonstration model: it has only ever seen phantoms.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pacsnode.analysis.cnn.package import MANIFEST_NAME, sha256_of

__all__ = ["TrainConfig", "default_manifest", "train"]

logger = logging.getLogger(__name__)

#: The architecture of the shipped model (MONAI UNet, about 206 k parameters, 0.8 MB).
ARCHITECTURE: dict[str, Any] = {
    "name": "UNet",
    "params": {
        "spatial_dims": 2,
        "in_channels": 3,
        "out_channels": 1,
        "channels": [16, 32, 64, 128],
        "strides": [2, 2, 2],
        "num_res_units": 1,
        "norm": "batch",
    },
}

#: Preprocessing of the shipped model: HU -1150..350 to 0..1, in-plane spacing 0.78125 mm.
PREPROCESSING: list[dict[str, Any]] = [
    {"kind": "resample", "spacing": [0.78125, 0.78125], "mode": "bilinear"},
    {"kind": "window", "center": -400.0, "width": 1500.0},
]

NODULE_LABEL: dict[str, Any] = {
    "value": 1,
    "name": "nodule",
    "category": {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Altered Structure"},
    "type": {"scheme": "SCT", "value": "27925004", "meaning": "Nodule"},
    "color": [255, 60, 60],
    "threshold": 0.5,
    "min_volume_mm3": 15.0,
    "finding_site": {"scheme": "SCT", "value": "39607008", "meaning": "Lung"},
    "lateralize": True,
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 16
    crop: int = 128
    learning_rate: float = 3e-3
    studies_in_pool: int = 6  # phantoms held in memory at once
    replace_every: int = 100  # steps between replacing one phantom of the pool
    slices: int = 40
    nodules_per_study: int = 10
    positive_fraction: float = 0.6  # crops centred near a nodule
    threads: int = 1  # fixed, so results do not depend on the core count (and one thread is steady under load)
    # With real series (``train(real=...)``) only:
    real_crops: int = 6  # crops of each batch from real series (the rest are phantom crops)
    real_nodules: int = 12  # phantom nodules inserted into a real series' lungs
    real_replace_every: int = 40  # steps between new insertions into one real series
    real_inserted_fraction: float = 0.4  # real crops centred near an inserted nodule
    real_tumour_fraction: float = 0.15  # real crops centred near an annotated tumour (the rest: anywhere in the lungs)


def default_manifest(sha256: str, training: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "name": "lung-nodule",
        "version": "1.0.0",
        "description": (
            "Lung nodule segmentation on CT (2.5D MONAI UNet). Trained by `pacsnode train` on synthetic chest CT "
            "phantoms only."
        ),
        "intended_use": "Demonstration model trained on synthetic phantoms. NOT FOR DIAGNOSTIC USE.",
        "weights": {"file": "model.pt", "format": "state_dict", "sha256": sha256},
        "architecture": ARCHITECTURE,
        "input": {
            "modality": ["CT"],
            "dims": "2d",
            "channels": 3,
            "divisible_by": 8,
            # Nodules lie inside the body: the network runs on the body's bounding box (plus 20 mm), not on
            # the air around it.
            "foreground": {"threshold": -500.0, "margin_mm": 20.0},
            "preprocessing": PREPROCESSING,
        },
        "output": {"kind": "segmentation", "activation": "sigmoid", "labels": [NODULE_LABEL]},
        "training": training,
    }


@dataclass
class _Study:
    image: np.ndarray  # float32 (slices, rows, columns) HU
    target: np.ndarray  # uint8 nodule mask
    positives: np.ndarray  # (n, 3) voxel indexes inside nodules
    body: np.ndarray  # (m, 3) voxel indexes of lung (negative crop centres)


def _make_study(rng: np.random.Generator, config: TrainConfig) -> _Study:
    from pacsnode.analysis.modeldev.synthetic import PhantomSpec, make_chest_phantom

    # The draws in this order: the weights' checksum depends on it.
    slice_thickness_mm = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5]))
    seed = int(rng.integers(0, 2**31 - 1))
    spec = PhantomSpec(
        slices=config.slices,
        size=512,
        slice_thickness_mm=slice_thickness_mm,
        noise_hu=float(rng.uniform(8.0, 30.0)),
        blur_sigma_mm=float(rng.uniform(0.0, 1.0)),
        emphysema_pockets=int(rng.integers(0, 6)),
        vessels=int(rng.integers(6, 16)),
        vessel_spheres=False,
        nodules=config.nodules_per_study,
        mirror_columns=bool(rng.integers(0, 2)),
    )
    phantom = make_chest_phantom(spec, seed=seed)
    target = (phantom.nodule_labels > 0).astype(np.uint8) if phantom.nodule_labels is not None else None
    if target is None:
        target = np.zeros(phantom.hu.shape, dtype=np.uint8)
    positives = np.argwhere(target > 0)
    lung = np.argwhere(phantom.labels[:, ::8, ::8] > 0) * np.array([1, 8, 8])
    return _Study(image=phantom.hu.astype(np.float32), target=target, positives=positives, body=lung)


def _crop(
    study: _Study, rng: np.random.Generator, config: TrainConfig, positive: bool
) -> tuple[np.ndarray, np.ndarray]:
    depth, rows, cols = study.image.shape
    pool = study.positives if positive and len(study.positives) else study.body
    if len(pool) == 0:
        centre = np.array([depth // 2, rows // 2, cols // 2])
    else:
        centre = pool[int(rng.integers(0, len(pool)))]
    half = config.crop // 2
    jitter = rng.integers(-half // 2, half // 2 + 1, size=2) if positive else np.zeros(2, dtype=int)
    r0 = int(np.clip(centre[1] + jitter[0] - half, 0, rows - config.crop))
    c0 = int(np.clip(centre[2] + jitter[1] - half, 0, cols - config.crop))
    z = int(centre[0])
    index = np.clip(np.arange(z - 1, z + 2), 0, depth - 1)
    x = study.image[index, r0 : r0 + config.crop, c0 : c0 + config.crop]
    y = study.target[z : z + 1, r0 : r0 + config.crop, c0 : c0 + config.crop]
    if rng.integers(0, 2):
        x, y = x[:, :, ::-1], y[:, :, ::-1]
    if rng.integers(0, 2):
        x, y = x[:, ::-1, :], y[:, ::-1, :]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


@dataclass
class _RealStudy:
    series: Any  # pacsnode.analysis.modeldev.real.RealSeries
    image: np.ndarray  # float32 HU with inserted nodules
    target: np.ndarray  # uint8: inserted nodules and the tumour
    inserted: np.ndarray  # (n, 3) voxel indexes inside inserted nodules
    tumour: np.ndarray  # (n, 3) voxel indexes of the tumour
    lung: np.ndarray  # (m, 3) voxel indexes of the lungs' region (hard negatives)


def _real_study(series: Any, rng: np.random.Generator, config: TrainConfig) -> _RealStudy:
    from pacsnode.analysis.modeldev.real import insert_nodules

    image, inserted, _ = insert_nodules(series, rng, config.real_nodules)
    target = ((inserted > 0) | series.tumour).astype(np.uint8)
    # Slices next to the annotated ones may show the tumour without a box: no crop is centred there.
    usable = np.ones(target.shape[0], dtype=bool)
    if series.tumour_slices:
        lo, hi = min(series.tumour_slices), max(series.tumour_slices)
        usable[max(lo - 2, 0) : hi + 3] = False
        usable[sorted(series.tumour_slices)] = True

    def centres(mask: np.ndarray, step: int) -> np.ndarray:
        found: np.ndarray = np.argwhere(mask[:, ::step, ::step]) * np.array([1, step, step])
        if len(found):
            found = found[usable[found[:, 0]]]
        return found

    return _RealStudy(
        series=series,
        image=image,
        target=target,
        inserted=centres(inserted > 0, 1),
        tumour=centres(series.tumour, 1),
        lung=centres(series.region, 4),
    )


def _real_crop(study: _RealStudy, rng: np.random.Generator, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    draw = rng.random()
    if draw < config.real_inserted_fraction and len(study.inserted):
        pool, positive = study.inserted, True
    elif draw < config.real_inserted_fraction + config.real_tumour_fraction and len(study.tumour):
        pool, positive = study.tumour, True
    else:
        pool, positive = study.lung, False
    shell = _Study(image=study.image, target=study.target, positives=pool, body=pool)
    return _crop(shell, rng, config, positive=positive)


def train(
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    *,
    progress: Callable[[int, float], None] | None = None,
    real: Path | None = None,
) -> dict[str, Any]:
    """Train the lung-nodule model and write a model package (manifest.json + model.pt) to ``out_dir``.

    ``real`` is a folder of real CT series folders (:func:`pacsnode.analysis.modeldev.real.real_series_dirs`,
    tumour boxes in an ``annotations.json`` beside them): each batch then holds ``config.real_crops``
    crops of those series, with phantom nodules inserted into their lungs (labelled), the annotated
    tumour (labelled) and the rest of the lungs (vessels, airways, pleura: labelled 0). Without it the
    training is phantoms only, as it always was.

    Returns
    -------
    dict
        The manifest written.
    """
    import torch
    from monai.losses.dice import DiceCELoss  # (monai packages do not declare their re-exports)

    from pacsnode.analysis.cnn.package import Manifest
    from pacsnode.analysis.cnn.preprocess import build_preprocessor

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(config.seed)

    manifest_model = Manifest.model_validate(default_manifest("0" * 64, {}))
    # Training crops come at the phantom's spacing, 400 mm / 512 = 0.78125 mm: the resample step is a no-op.
    window = build_preprocessor([s for s in manifest_model.input.preprocessing if getattr(s, "kind", "") != "resample"])
    from monai.networks.nets.unet import UNet

    net = UNet(**ARCHITECTURE["params"])
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.steps, eta_min=config.learning_rate / 30
    )
    loss_fn = DiceCELoss(sigmoid=True, smooth_nr=1e-3, smooth_dr=1e-3, batch=True)

    pool = [_make_study(rng, config) for _ in range(config.studies_in_pool)]
    real_rng = np.random.default_rng([config.seed, 1])  # the phantom draws stay those of phantom-only training
    real_studies: list[_RealStudy] = []
    real_names: list[str] = []
    if real is not None:
        from pacsnode.analysis.modeldev.real import load_real_series, real_series_dirs

        for folder in real_series_dirs(Path(real)):
            series = load_real_series(folder, pixel_mm=0.78125)
            real_studies.append(_real_study(series, real_rng, config))
            real_names.append(series.name)
        if not real_studies:
            raise ValueError(f"no CT series folders in {real}")
    phantom_crops = config.batch_size - config.real_crops if real_studies else config.batch_size
    net.train()
    losses: list[float] = []
    for step in range(1, config.steps + 1):
        if step % config.replace_every == 0:
            pool[int(rng.integers(0, len(pool)))] = _make_study(rng, config)
        xs, ys = [], []
        for _ in range(phantom_crops):
            study = pool[int(rng.integers(0, len(pool)))]
            image, label = _crop(study, rng, config, positive=bool(rng.random() < config.positive_fraction))
            xs.append(image)
            ys.append(label)
        if real_studies:
            if step % config.real_replace_every == 0:
                k = int(real_rng.integers(0, len(real_studies)))
                real_studies[k] = _real_study(real_studies[k].series, real_rng, config)
            for _ in range(config.real_crops):
                image, label = _real_crop(real_studies[int(real_rng.integers(0, len(real_studies)))], real_rng, config)
                xs.append(image)
                ys.append(label)
        x = torch.from_numpy(np.stack(xs))
        y = torch.from_numpy(np.stack(ys).astype(np.float32))
        with torch.no_grad():
            x, _ = window(x, (0.78125, 0.78125))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress is not None and (step % 50 == 0 or step == config.steps):
            progress(step, float(np.mean(losses[-50:])))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net.eval()
    weights = out_dir / "model.pt"
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    torch.save(state, weights)
    data = (
        "synthetic chest CT phantoms (pacsnode.analysis.modeldev.synthetic) with solid, part-solid and ground-glass nodules "
        "of 4-24 mm, noise 8-30 HU, blur 0-1 mm, slice thickness 1-2.5 mm"
    )
    if real_studies:
        data += (
            f"; real chest CT series {', '.join(real_names)} ({config.real_crops} of {config.batch_size} crops per batch): "
            "phantom nodules inserted into their lungs, the annotated tumour as positives, the rest of the lungs as negatives"
        )
    else:
        data += "; no patient data"
    training = {
        "command": "pacsnode train" + (" --real DIR" if real_studies else ""),
        "config": asdict(config),
        "data": data,
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    manifest = default_manifest(sha256_of(weights), training)
    Manifest.model_validate(manifest)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("trained %s in %.0f s, final loss %.4f", out_dir, training["seconds"], training["final_loss"])
    return manifest
