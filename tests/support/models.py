"""Small model packages and MONAI Bundles made by the tests (seeded, a few kB each)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from tests.support.helpers import sha256_file

TINY_UNET_2D: dict[str, Any] = {
    "name": "UNet",
    "params": {
        "spatial_dims": 2,
        "in_channels": 3,
        "out_channels": 1,
        "channels": [4, 8],
        "strides": [2],
        "num_res_units": 0,
        "norm": "batch",
    },
}
TINY_UNET_3D: dict[str, Any] = {
    "name": "UNet",
    "params": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [4, 8],
        "strides": [2],
        "num_res_units": 0,
        "norm": "instance",
    },
}
NODULE = {
    "value": 1,
    "name": "nodule",
    "category": {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Altered Structure"},
    "type": {"scheme": "SCT", "value": "27925004", "meaning": "Nodule"},
    "threshold": 0.5,
}


def _trace(net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Save ``net`` as TorchScript, the format of MONAI Model Zoo bundles (torch deprecates making it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation, and tracer warnings about shape checks
        torch.jit.trace(net, example).save(str(path))


def _network(architecture: dict[str, Any], seed: int) -> torch.nn.Module:
    from monai.networks import nets

    torch.manual_seed(seed)
    net = getattr(nets, architecture["name"])(**architecture["params"])
    # Random but not degenerate batch-norm statistics, so that eval mode gives varied outputs.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return net.eval()


def make_package(
    root: Path,
    *,
    architecture: dict[str, Any] = TINY_UNET_2D,
    dims: str = "2d",
    channels: int = 3,
    output: dict[str, Any] | None = None,
    preprocessing: list[dict[str, Any]] | None = None,
    torchscript: bool = False,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    divisible_by: int = 2,
) -> Path:
    """Write a model package (manifest.json + model.pt) to ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    net = _network(architecture, seed)
    weights = root / "model.pt"
    if torchscript:
        example = torch.zeros((1, channels, *([16] * (2 if dims == "2d" else 3))))
        _trace(net, example, weights)
    else:
        torch.save(net.state_dict(), weights)
    manifest: dict[str, Any] = {
        "schema_version": 1,
        "name": "tiny",
        "version": "0.1",
        "weights": {
            "file": "model.pt",
            "format": "torchscript" if torchscript else "state_dict",
            "sha256": sha256_file(weights),
        },
        "input": {
            "modality": ["CT"],
            "dims": dims,
            "channels": channels,
            "divisible_by": divisible_by,
            "preprocessing": preprocessing
            if preprocessing is not None
            else [{"kind": "window", "center": -400, "width": 1500}],
        },
        "output": output or {"kind": "segmentation", "activation": "sigmoid", "labels": [NODULE]},
    }
    if not torchscript:
        manifest["architecture"] = architecture
    manifest.update(extra or {})
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def make_bundle(
    root: Path, *, torchscript: bool = False, with_hash: bool = True, seed: int = 0, dims: str = "3d"
) -> Path:
    """Write a MONAI Bundle: configs/metadata.json, configs/inference.json, models/model.pt|ts, large_files.yml.

    ``dims="2d"`` gives a 2D network with batch norm (one input channel, two outputs) instead of the 3D one.
    """
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    architecture = TINY_UNET_3D
    if dims == "2d":
        architecture = {"name": "UNet", "params": {**TINY_UNET_2D["params"], "in_channels": 1, "out_channels": 2}}
    shape = [16] * (3 if dims == "3d" else 2)
    net = _network(architecture, seed)
    if torchscript:
        weights = root / "models" / "model.ts"
        _trace(net, torch.zeros((1, 1, *shape)), weights)
    else:
        weights = root / "models" / "model.pt"
        torch.save(net.state_dict(), weights)
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.2.0",
        "name": "Tiny spleen segmentation",
        "description": "a test bundle",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "is_patch_data": True,
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 2,
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "channel_def": {"0": "background", "1": "spleen"},
                }
            },
        },
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    inference = {"network_def": {"_target_": "UNet", **architecture["params"]}}
    (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    if with_hash:
        (root / "large_files.yml").write_text(
            "large_files:\n"
            f'  - path: "{weights.relative_to(root).as_posix()}"\n'
            '    url: "https://example.invalid/model"\n'
            f'    hash_val: "{sha256_file(weights)}"\n'
            '    hash_type: "sha256"\n'
        )
    return root
