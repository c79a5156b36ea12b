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

This is a demonstration model: the shipped weights have only ever seen phantoms.

With ``real`` series (``pacsnode train --real DIR``) each batch gets ``real_crops`` more crops of real
chest CT: phantom nodules inserted into the real lungs and the annotated tumour as positives, the rest of
the lungs as negatives, and hard negatives mined from the network itself: every ``real_mine_every`` steps
it runs on the real series and the voxels of the lungs where it fires off the labels (vessels, airways,
pleura) become crop centres. Optionally some phantoms get the real series' 5 mm slices
(``real_thick_phantoms``) and some real crops thinner-looking channels (``real_thin_fraction``). All of
it is drawn from the seed (the phantoms' draws stay those of phantom-only training).
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
    real_crops: int = 6  # crops of real series added to each batch's ``batch_size`` phantom crops
    real_nodules: int = 12  # phantom nodules inserted into a real series' lungs
    real_replace_every: int = 40  # steps between new insertions into one real series
    real_inserted_fraction: float = 0.45  # real crops centred near an inserted nodule
    real_tumour_fraction: float = 0.1  # real crops centred near an annotated tumour
    real_hard_fraction: float = 0.3  # real crops centred on a mined hard negative (the rest: anywhere in the lungs)
    real_mine_every: int = 200  # steps between minings of hard negatives: where the network fires off the labels
    real_mine_threshold: float = 0.3  # probability above which a voxel off the labels is a hard negative
    real_thin_fraction: float = 0.0  # real crops whose side channels are interpolated nearer (as thinner slices)
    real_thick_phantoms: float = 0.0  # phantoms made with 5 mm slices, like the real series (drawn apart)


def default_manifest(sha256: str, training: dict[str, Any], real: list[str] | None = None) -> dict[str, Any]:
    """The model package's manifest; ``real``: the names of the real series it was trained on, if any."""
    if real:
        series = ", ".join(real)
        description = (
            "Lung nodule segmentation on CT (2.5D MONAI UNet). Trained by `pacsnode train --real DIR` on synthetic "
            f"chest CT phantoms and on the lungs of real chest CT series ({series}): phantom nodules inserted into "
            "them and the annotated tumour as positives, the rest of the lungs and the network's own false "
            "positives there (hard negatives mined during training) as negatives."
        )
        intended_use = (
            "Demonstration model trained on synthetic phantoms and on real lung backgrounds of one patient "
            f"({series}: two reconstructions of the same CT). Its figures on those series are not a held-out "
            "test. NOT FOR DIAGNOSTIC USE."
        )
    else:
        description = (
            "Lung nodule segmentation on CT (2.5D MONAI UNet). Trained by `pacsnode train` on synthetic chest CT "
            "phantoms only."
        )
        intended_use = "Demonstration model trained on synthetic phantoms. NOT FOR DIAGNOSTIC USE."
    return {
        "schema_version": 1,
        "name": "lung-nodule",
        "version": "1.0.0",
        "description": description,
        "intended_use": intended_use,
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


def _make_study(rng: np.random.Generator, config: TrainConfig, slice_mm: float | None = None) -> _Study:
    """A phantom of ``rng``'s draws; ``slice_mm``: its slice thickness instead of the drawn one (same draws)."""
    from pacsnode.analysis.modeldev.synthetic import PhantomSpec, make_chest_phantom

    # The draws in this order: the weights' checksum depends on it.
    slice_thickness_mm = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5]))
    if slice_mm is not None:
        slice_thickness_mm = slice_mm
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
    study: _Study, rng: np.random.Generator, config: TrainConfig, positive: bool, spread: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """A crop centred on a voxel of ``study.positives`` (or ``study.body``): 3 slices as channels.

    The side channels lie ``spread`` slices from the centre one (linear interpolation when it is under 1:
    the look of thinner slices)."""
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
    if spread == 1.0:
        index = np.clip(np.arange(z - 1, z + 2), 0, depth - 1)
        x = study.image[index, r0 : r0 + config.crop, c0 : c0 + config.crop]
    else:
        window = study.image[:, r0 : r0 + config.crop, c0 : c0 + config.crop]
        channels = []
        for position in (z - spread, float(z), z + spread):
            p = float(np.clip(position, 0, depth - 1))
            lo = int(np.floor(p))
            hi = min(lo + 1, depth - 1)
            w = np.float32(p - lo)
            channels.append((1 - w) * window[lo] + w * window[hi])
        x = np.stack(channels)
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
    lung: np.ndarray  # (m, 3) voxel indexes of the lungs' region (negatives)
    usable: np.ndarray  # bool per slice: crops may be centred there


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
        usable=usable,
    )


def _real_crop(
    study: _RealStudy, hard: np.ndarray, rng: np.random.Generator, config: TrainConfig
) -> tuple[np.ndarray, np.ndarray]:
    """A crop of a real series: near an inserted nodule, the tumour, a hard negative (``hard``) or anywhere in the lungs."""
    draw = rng.random()
    inserted = config.real_inserted_fraction
    tumour = inserted + config.real_tumour_fraction
    if draw < inserted and len(study.inserted):
        pool, positive = study.inserted, True
    elif inserted <= draw < tumour and len(study.tumour):
        pool, positive = study.tumour, True
    elif tumour <= draw < tumour + config.real_hard_fraction and len(hard):
        pool, positive = hard, False
    else:
        pool, positive = study.lung, False
    spread = float(rng.uniform(0.2, 1.0)) if rng.random() < config.real_thin_fraction else 1.0
    shell = _Study(image=study.image, target=study.target, positives=pool, body=pool)
    return _crop(shell, rng, config, positive=positive, spread=spread)


def _mine_hard_negatives(
    net: Any, window: Any, study: _RealStudy, rng: np.random.Generator, config: TrainConfig, limit: int = 20000
) -> np.ndarray:
    """Voxels of the lungs' region where the network (as it is now) fires, off the labels: (n, 3) indexes.

    The network runs on every slice of the series that has lungs (the region's bounding box); a voxel
    whose probability is over ``config.real_mine_threshold``, not within 3 voxels of a label and on a
    usable slice is a hard negative (vessels, bronchial walls, pleura, whatever the network takes for a
    nodule). At most ``limit`` of them, drawn with ``rng``.
    """
    import torch
    from scipy import ndimage

    region = study.series.region
    ks = np.flatnonzero(region.any(axis=(1, 2)) & study.usable)
    if len(ks) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    depth, rows, cols = study.image.shape
    rr = np.flatnonzero(region.any(axis=(0, 2)))
    cc = np.flatnonzero(region.any(axis=(0, 1)))
    r0, c0 = max(int(rr[0]) - 8, 0), max(int(cc[0]) - 8, 0)
    r1, c1 = min(int(rr[-1]) + 9, rows), min(int(cc[-1]) + 9, cols)
    r1, c1 = r0 + (r1 - r0) // 8 * 8, c0 + (c1 - c0) // 8 * 8  # the UNet wants sizes divisible by 8
    prob = np.zeros((depth, r1 - r0, c1 - c0), dtype=np.float32)
    net.eval()
    with torch.no_grad():
        for start in range(0, len(ks), 8):
            chunk = ks[start : start + 8]
            index = np.clip(chunk[:, None] + np.arange(-1, 2)[None, :], 0, depth - 1)
            x = torch.from_numpy(np.ascontiguousarray(study.image[index, r0:r1, c0:c1]))
            x, _ = window(x, (0.78125, 0.78125))
            prob[chunk] = torch.sigmoid(net(x))[:, 0].numpy()
    net.train()
    near = ndimage.binary_dilation(study.target[:, r0:r1, c0:c1] > 0, structure=np.ones((1, 7, 7), dtype=bool))
    hard = (prob > config.real_mine_threshold) & region[:, r0:r1, c0:c1] & ~near
    found: np.ndarray = np.argwhere(hard) + np.array([0, r0, c0])
    if len(found) > limit:
        found = found[np.sort(rng.choice(len(found), size=limit, replace=False))]
    return found


def train(
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    *,
    progress: Callable[[int, float], None] | None = None,
    real: Path | None = None,
    init: str | None = None,
) -> dict[str, Any]:
    """Train the lung-nodule model and write a model package (manifest.json + model.pt) to ``out_dir``.

    ``real`` is a folder of real CT series folders (:func:`pacsnode.analysis.modeldev.real.real_series_dirs`,
    tumour boxes in an ``annotations.json`` beside them): each batch then holds ``config.real_crops``
    crops of those series, with phantom nodules inserted into their lungs (labelled), the annotated
    tumour (labelled) and the rest of the lungs (vessels, airways, pleura: labelled 0). Without it the
    training is phantoms only, as it always was. ``init`` (a model package's name or folder, of this
    architecture) starts from that package's weights instead of random ones: a fine-tuning.

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
    init_from: dict[str, str] = {}
    if init is not None:
        from pacsnode.analysis.cnn.package import load_package
        from pacsnode.analysis.errors import ModelError

        start = load_package(init)
        architecture = start.manifest.architecture
        if start.bundle_config is not None or architecture is None or architecture.model_dump() != ARCHITECTURE:
            raise ModelError(f"--init {init}: not a package of this model's architecture ({ARCHITECTURE['name']})")
        net.load_state_dict(start.build("cpu").state_dict())  # build: a ModelError says why they do not load
        init_from = {
            "name": start.manifest.name,
            "version": start.manifest.version,
            "sha256": start.manifest.weights.sha256,
        }
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.steps, eta_min=config.learning_rate / 30
    )
    loss_fn = DiceCELoss(sigmoid=True, smooth_nr=1e-3, smooth_dr=1e-3, batch=True)

    real_rng = np.random.default_rng([config.seed, 1])  # the phantom draws stay those of phantom-only training

    def thickness() -> float | None:  # with real series: some phantoms with their 5 mm slices
        if real is None or config.real_thick_phantoms <= 0:
            return None
        return 5.0 if real_rng.random() < config.real_thick_phantoms else None

    pool = [_make_study(rng, config, thickness()) for _ in range(config.studies_in_pool)]
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
    hard: list[np.ndarray] = [np.zeros((0, 3), dtype=np.int64) for _ in real_studies]  # per series
    mined: list[int] = []
    net.train()
    losses: list[float] = []
    for step in range(1, config.steps + 1):
        if step % config.replace_every == 0:
            pool[int(rng.integers(0, len(pool)))] = _make_study(rng, config, thickness())
        xs, ys = [], []
        for _ in range(config.batch_size):
            study = pool[int(rng.integers(0, len(pool)))]
            image, label = _crop(study, rng, config, positive=bool(rng.random() < config.positive_fraction))
            xs.append(image)
            ys.append(label)
        if real_studies:
            if step % config.real_replace_every == 0:
                k = int(real_rng.integers(0, len(real_studies)))
                real_studies[k] = _real_study(real_studies[k].series, real_rng, config)
            if config.real_mine_every > 0 and step % config.real_mine_every == 0 and step < config.steps:
                hard = [_mine_hard_negatives(net, window, study, real_rng, config) for study in real_studies]
                mined.append(sum(len(h) for h in hard))
                logger.info("step %d: %s hard negative voxels mined", step, [len(h) for h in hard])
            for _ in range(config.real_crops):
                k = int(real_rng.integers(0, len(real_studies)))
                image, label = _real_crop(real_studies[k], hard[k], real_rng, config)
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
            f"; real chest CT series {', '.join(real_names)} ({config.real_crops} crops per batch besides the "
            f"{config.batch_size} phantom crops): phantom nodules inserted into their lungs, the annotated tumour "
            "(boxes intersected with soft tissue) as positives, the rest of the lungs and hard negatives mined where "
            "the network fired off the labels (vessels, airways, pleura) as negatives"
            + (
                f"; {config.real_thick_phantoms:.0%} of the phantoms with 5 mm slices"
                if config.real_thick_phantoms
                else ""
            )
            + (
                f"; {config.real_thin_fraction:.0%} of the real crops with thinner-looking channels"
                if config.real_thin_fraction
                else ""
            )
            + ". Source of the real series: "
            "TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461, CC BY 4.0)"
        )
    else:
        data += "; no patient data"
    training = {
        "command": "pacsnode train"
        + (" --real DIR" if real_studies else "")
        + (
            f" --init {init if init == init_from['name'] else 'DIR'} --learning-rate {config.learning_rate:g}"
            if init_from
            else ""
        ),
        **({"init": init_from} if init_from else {}),
        "config": asdict(config),
        "data": data,
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        **({"hard_negative_voxels_mined": mined} if real_studies else {}),
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    manifest = default_manifest(sha256_of(weights), training, real_names)
    Manifest.model_validate(manifest)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("trained %s in %.0f s, final loss %.4f", out_dir, training["seconds"], training["final_loss"])
    return manifest
