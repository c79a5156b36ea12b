"""Training is reproducible from its seed; the shipped weights come from ``pacsnode train``.

``pacsnode evaluate``, run as a process, is tested in tests/acceptance/test_evaluate.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsnode.analysis.cnn.package import load_package
from pacsnode.analysis.modeldev.training import TrainConfig, train
from tests.support.helpers import real_chest_ct

TINY = {"steps": 3, "batch_size": 2, "crop": 64, "studies_in_pool": 1, "slices": 6, "nodules_per_study": 2}


def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not(tmp_path: Path) -> None:
    a = train(tmp_path / "a", TrainConfig(seed=5, **TINY))
    b = train(tmp_path / "b", TrainConfig(seed=5, **TINY))
    c = train(tmp_path / "c", TrainConfig(seed=6, **TINY))
    assert a["weights"]["sha256"] == b["weights"]["sha256"]
    assert a["weights"]["sha256"] != c["weights"]["sha256"]
    package = load_package(tmp_path / "a")  # a valid package: manifest, checksum
    assert package.manifest.training["config"]["seed"] == 5
    assert package.weights_path.stat().st_size < 10 * 1024 * 1024


def test_a_crops_side_channels_lie_spread_slices_from_its_centre() -> None:
    """``spread`` 1: the adjacent slices; under 1: interpolated nearer the centre (the look of thinner slices)."""
    import numpy as np

    from pacsnode.analysis.modeldev.training import _crop, _Study

    image = np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None], (6, 16, 16)).copy()
    study = _Study(
        image=image,
        target=np.zeros(image.shape, dtype=np.uint8),
        positives=np.array([[3, 8, 8]]),
        body=np.array([[3, 8, 8]]),
    )
    config = TrainConfig(crop=8)
    x, y = _crop(study, np.random.default_rng(0), config, positive=False)
    assert x.shape == (3, 8, 8) and y.shape == (1, 8, 8)
    assert x[:, 0, 0].tolist() == [2.0, 3.0, 4.0]
    x, _ = _crop(study, np.random.default_rng(0), config, positive=False, spread=0.25)
    assert x[:, 0, 0].tolist() == [2.75, 3.0, 3.25]


def test_the_shipped_weights_come_from_pacsnode_train() -> None:
    package = load_package("lung-nodule")
    training = package.manifest.training
    assert training["command"] == "pacsnode train"
    assert "synthetic" in training["data"] and "no patient data" in training["data"]
    assert training["config"]["seed"] == 0


@pytest.mark.slow
def test_training_with_real_series_is_reproducible_and_inserted_nodules_lie_in_the_lungs(tmp_path: Path) -> None:
    """``train(real=...)``: same seed, same weights; the inserted nodules are inside the aerated lung.

    Data: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461, CC BY 4.0),
    read where it lies via ``real_chest_ct()``; skipped when absent.
    """
    import numpy as np

    from pacsnode.analysis.modeldev.real import insert_nodules, load_real_series

    data = real_chest_ct()
    series = load_real_series(data / "A0001-5mm-L", pixel_mm=0.78125)
    assert series.tumour.any() and not (series.tumour & ~series.region).any()
    image, labels, truths = insert_nodules(series, np.random.default_rng(0), 6)
    assert truths and int(labels.max()) == len(truths)
    assert series.lung[labels > 0].all() and (image[labels > 0] > series.hu[labels > 0]).mean() > 0.9

    real = tmp_path / "real"
    real.mkdir()
    (real / "A0001-5mm-L").symlink_to(data / "A0001-5mm-L")
    (real / "annotations.json").symlink_to(data / "annotations.json")
    # Hard negatives mined once (at step 2), some phantoms with 5 mm slices, some real crops with thin channels.
    config = TrainConfig(
        seed=5, **TINY, real_crops=2, real_mine_every=2, real_thick_phantoms=0.5, real_thin_fraction=0.5
    )
    a = train(tmp_path / "a", config, real=real)
    b = train(tmp_path / "b", config, real=real)
    assert a["weights"]["sha256"] == b["weights"]["sha256"]
    assert "A0001-5mm-L" in a["training"]["data"] and a["training"]["command"] == "pacsnode train --real DIR"
    assert len(a["training"]["hard_negative_voxels_mined"]) == 1
    assert "NOT FOR DIAGNOSTIC USE" in a["intended_use"] and "not a held-out" in a["intended_use"]


@pytest.mark.slow
def test_hard_negatives_are_mined_in_the_lungs_off_the_labels() -> None:
    """Where the network fires in the real lungs, off the tumour and the inserted nodules, is a hard negative.

    Data: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461, CC BY 4.0),
    read where it lies via ``real_chest_ct()``; skipped when absent.
    """
    import numpy as np
    import torch
    from monai.networks.nets.unet import UNet

    from pacsnode.analysis.cnn.preprocess import build_preprocessor
    from pacsnode.analysis.modeldev.real import load_real_series
    from pacsnode.analysis.modeldev.training import ARCHITECTURE, _mine_hard_negatives, _real_study

    series = load_real_series(real_chest_ct() / "A0001-5mm-B", pixel_mm=0.78125)
    config = TrainConfig(real_mine_threshold=0.0)  # an untrained network: every voxel it sees counts
    study = _real_study(series, np.random.default_rng(0), config)
    torch.manual_seed(0)
    net = UNet(**ARCHITECTURE["params"])
    window = build_preprocessor([{"kind": "window", "center": -400.0, "width": 1500.0}])
    found = _mine_hard_negatives(net, window, study, np.random.default_rng(0), config, limit=5000)
    assert len(found) == 5000 and net.training
    z, r, c = found.T
    assert series.region[z, r, c].all() and not study.target[z, r, c].any() and study.usable[z].all()


def test_a_fine_tuning_starts_from_the_given_packages_weights_and_says_so(tmp_path: Path) -> None:
    import torch

    shipped = load_package("lung-nodule")
    tuned = train(tmp_path / "t", TrainConfig(seed=5, learning_rate=1e-9, **TINY), init="lung-nodule")
    assert tuned["training"]["init"] == {
        "name": "lung-nodule",
        "version": "1.0.0",
        "sha256": shipped.manifest.weights.sha256,
    }
    assert "--init lung-nodule" in tuned["training"]["command"]
    start = torch.load(shipped.weights_path, weights_only=True)
    after = torch.load(load_package(tmp_path / "t").weights_path, weights_only=True)
    # A learning rate of 1e-9 over 3 steps leaves the weights where they began (Adam moves each by at most
    # the rate per step); a random start would not be near them. Batch-norm statistics still move.
    moved = [
        k
        for k in start
        if start[k].is_floating_point() and "running" not in k and not torch.allclose(start[k], after[k], atol=1e-6)
    ]
    assert moved == []
    scratch = train(tmp_path / "s", TrainConfig(seed=5, learning_rate=1e-9, **TINY))
    assert scratch["weights"]["sha256"] != tuned["weights"]["sha256"] and "init" not in scratch["training"]


def test_a_fine_tuning_refuses_a_package_of_another_architecture(tmp_path: Path) -> None:
    import json
    import shutil

    from pacsnode.analysis.errors import ModelError

    other = tmp_path / "other"
    shutil.copytree(load_package("lung-nodule").root, other)
    manifest = json.loads((other / "manifest.json").read_text(encoding="utf-8"))
    manifest["architecture"]["params"]["channels"] = [8, 16, 32, 64]
    (other / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ModelError, match="architecture"):
        train(tmp_path / "t", TrainConfig(seed=5, **TINY), init=str(other))
