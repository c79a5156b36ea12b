"""Model packages: a folder with weights and a manifest, or a MONAI Bundle.

A pacsnode model package is a folder holding ``manifest.json`` and the
weights it names::

    lung-nodule/
        manifest.json      name, version, weights (file, format, sha256),
                           architecture (for a state dict), input and output spec
        model.pt           TorchScript, or a state dict of the named architecture

A MONAI Bundle (``configs/metadata.json`` plus ``models/model.ts`` or
``models/model.pt`` with ``network_def`` in ``configs/inference.json``) loads
too; what the bundle does not say in a form pacsnode can use (the SHA-256 of
the weights when ``large_files`` has none, DICOM codes of the labels,
preprocessing) comes from ``overrides`` given in the rule's params.

Loading a package reads and validates the manifest and checks the weights'
SHA-256; it imports neither torch nor MONAI, so ``check-config`` stays quick.
:meth:`ModelPackage.build` makes the torch module.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pacsnode.analysis.cnn.steps import Step
from pacsnode.analysis.errors import ModelError
from pacsnode.storage.model_base import StrictModel

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from pydicom.sr.coding import Code

__all__ = [
    "ArchitectureSpec",
    "BUILTIN_MODELS",
    "ClassOutput",
    "CodeSpec",
    "ForegroundCrop",
    "InputSpec",
    "LabelOutput",
    "Manifest",
    "ModelPackage",
    "OutputSpec",
    "WeightsSpec",
    "load_package",
    "sha256_of",
]

logger = logging.getLogger(__name__)

#: Model packages shipped with pacsnode, by name.
BUILTIN_MODELS: dict[str, Path] = {
    "lung-nodule": Path(__file__).parent / "model_zoo" / "lung-nodule",
}

MANIFEST_NAME = "manifest.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CodeSpec(StrictModel):
    """A coded concept: ``{scheme, value, meaning}``, e.g. SCT 27925004 "Nodule"."""

    scheme: Annotated[str, Field(min_length=1, max_length=16)]
    value: Annotated[str, Field(min_length=1, max_length=64)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]

    def to_code(self) -> Code:
        from pydicom.sr.coding import Code

        return Code(self.value, self.scheme, self.meaning)


_ANATOMICAL_STRUCTURE = CodeSpec(scheme="SCT", value="91723000", meaning="Anatomical Structure")


class LabelOutput(StrictModel):
    """One label of a segmentation model: the output channel (or class value) and what it means."""

    value: Annotated[int, Field(ge=1, le=255)]
    name: Annotated[str, Field(min_length=1, max_length=48)]
    category: CodeSpec = _ANATOMICAL_STRUCTURE
    type: CodeSpec | None = None  # default: 99PACSNODE <NAME>
    modifier: CodeSpec | None = None
    color: tuple[int, int, int] = (255, 64, 64)
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    min_volume_mm3: Annotated[float, Field(ge=0)] = 0.0
    finding_site: CodeSpec | None = None  # e.g. SCT 39607008 "Lung"
    lateralize: bool = False  # state the side (patient x) of each finding as its laterality

    def type_code(self) -> CodeSpec:
        if self.type is not None:
            return self.type
        value = re.sub(r"[^A-Z0-9]+", "", self.name.upper())[:16] or "LABEL"
        return CodeSpec(scheme="99PACSNODE", value=value, meaning=self.name[:64])


class ClassOutput(StrictModel):
    """One output of a classification model."""

    index: Annotated[int, Field(ge=0)]  # output channel
    name: Annotated[str, Field(min_length=1, max_length=48)]
    code: CodeSpec
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5


class ForegroundCrop(StrictModel):
    """Run the network only inside the in-plane bounding box of the voxels above ``threshold`` (e.g. the body).

    Outside it the output is 0 (background). The box is the same for every slice of a volume, widened by
    ``margin_mm`` so the network sees the context it was trained with.
    """

    threshold: float = -500.0  # raw intensity (HU for CT)
    margin_mm: Annotated[float, Field(ge=0)] = 20.0


class InputSpec(StrictModel):
    """What the network takes and how images are prepared for it."""

    modality: list[str] = ["CT"]
    dims: Literal["2d", "3d"] = "2d"
    # 2d: adjacent slices stacked as channels (odd: the slice and its neighbours); 3d: image channels.
    channels: Annotated[int, Field(ge=1, le=15)] = 1
    # Patch for sliding-window inference; null: whole slices (2d) or the whole volume (3d).
    roi_size: list[Annotated[int, Field(ge=1)]] | None = None
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.25
    # Spatial sizes are padded up to a multiple of this (UNets with n downsamplings need 2**n).
    divisible_by: Annotated[int, Field(ge=1, le=256)] = 1
    foreground: ForegroundCrop | None = None
    preprocessing: list[Step] = []

    @model_validator(mode="after")
    def _shape(self) -> InputSpec:
        if self.dims == "2d" and self.channels % 2 == 0:
            raise ValueError("a 2d model takes an odd number of adjacent slices as channels")
        if self.dims == "2d" and self.roi_size is not None:
            raise ValueError("roi_size (sliding-window patch) is for 3d models; a 2d model sees whole slices")
        want = 2 if self.dims == "2d" else 3
        if self.roi_size is not None and len(self.roi_size) != want:
            raise ValueError(f"roi_size of a {self.dims} model has {want} values, not {len(self.roi_size)}")
        return self


class OutputSpec(StrictModel):
    kind: Literal["segmentation", "classification"]
    activation: Literal["sigmoid", "softmax", "none"] = "sigmoid"
    labels: list[LabelOutput] = []
    classes: list[ClassOutput] = []

    @model_validator(mode="after")
    def _outputs(self) -> OutputSpec:
        if self.kind == "segmentation" and not self.labels:
            raise ValueError("a segmentation model lists its labels")
        if self.kind == "classification" and not self.classes:
            raise ValueError("a classification model lists its classes")
        values = [label.value for label in self.labels] + [c.index for c in self.classes]
        if len(values) != len(set(values)):
            raise ValueError("label values (class indexes) must be unique")
        return self

    @property
    def channels_needed(self) -> int:
        """The fewest output channels a network must give for this spec."""
        if self.kind == "classification":
            return max(c.index for c in self.classes) + 1
        top = max(label.value for label in self.labels)
        return top + 1 if self.activation == "softmax" else top


class WeightsSpec(StrictModel):
    file: Annotated[str, Field(min_length=1, max_length=200)]
    format: Literal["torchscript", "state_dict"]
    sha256: str

    @field_validator("file")
    @classmethod
    def _relative(cls, value: str) -> str:
        path = Path(value)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"{value!r} must be a path inside the package folder")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.lower()
        if not _SHA256.match(value):
            raise ValueError("not a SHA-256 (64 hexadecimal digits)")
        return value


class ArchitectureSpec(StrictModel):
    """A network class, by name in ``monai.networks.nets`` or ``module:Class``, and its arguments."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    params: dict[str, Any] = {}


class Manifest(StrictModel):
    schema_version: Literal[1] = 1
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    version: Annotated[str, Field(min_length=1, max_length=32)]
    description: str = ""
    intended_use: str = "Research and demonstration only. Not for diagnostic use."
    weights: WeightsSpec
    architecture: ArchitectureSpec | None = None
    input: InputSpec
    output: OutputSpec
    training: dict[str, Any] = {}

    @model_validator(mode="after")
    def _architecture(self) -> Manifest:
        if self.weights.format == "state_dict" and self.architecture is None:
            raise ValueError("weights in state_dict format need an architecture")
        return self


@dataclass(frozen=True, kw_only=True)
class ModelPackage:
    """A validated model package whose weights have the SHA-256 its manifest states."""

    root: Path
    manifest: Manifest
    weights_path: Path
    bundle_config: Path | None = None  # a MONAI Bundle's inference config (network_def)

    @property
    def key(self) -> str:
        """Identifies the package's content: its folder, the manifest as validated, the weights checksum."""
        manifest = hashlib.sha256(self.manifest.model_dump_json().encode()).hexdigest()[:16]
        return f"{self.root.resolve()}:{manifest}:{self.manifest.weights.sha256}"

    def build(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The network with its weights, in eval mode, on ``device``.

        Raises
        ------
        ModelError
            If the weights do not load into the architecture.
        """
        import torch

        weights = self.manifest.weights
        try:
            if weights.format == "torchscript":
                # MONAI Model Zoo bundles ship TorchScript; torch deprecates the format but still loads it.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    # torch.jit.load is not annotated; it returns the ScriptModule
                    module: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
                        str(self.weights_path), map_location="cpu"
                    )
            else:
                module = self._architecture()
                state = torch.load(str(self.weights_path), map_location="cpu", weights_only=True)
                if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                    state = state["model"]  # a training checkpoint
                module.load_state_dict(state, strict=True)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(
                f"model {self.manifest.name}: cannot load {self.weights_path.name}: {_short(exc)}"
            ) from exc
        return module.eval().to(device)

    def _architecture(self) -> torch.nn.Module:
        import torch

        if self.bundle_config is not None:
            from monai.bundle.config_parser import ConfigParser  # monai.bundle does not declare re-exports

            parser = ConfigParser()
            parser.read_config(str(self.bundle_config))
            try:
                module = parser.get_parsed_content("network_def")
            except Exception as exc:
                raise ModelError(f"bundle {self.root.name}: cannot build network_def: {_short(exc)}") from exc
        else:
            assert self.manifest.architecture is not None
            spec = self.manifest.architecture
            cls = _network_class(spec.name)
            try:
                module = cls(**spec.params)
            except Exception as exc:
                raise ModelError(f"model {self.manifest.name}: architecture {spec.name}: {_short(exc)}") from exc
        if not isinstance(module, torch.nn.Module):
            raise ModelError(f"model {self.manifest.name}: the architecture is not a torch module")
        return module


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, hex; cached per (path, size, mtime) in this process (``HASHES_KEPT`` files)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _HASHES_LOCK:
        cached = _HASHES.get(key)
        if cached is not None:
            _HASHES.move_to_end(key)
            return cached
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    with _HASHES_LOCK:
        cached = _HASHES[key] = digest.hexdigest()
        while len(_HASHES) > HASHES_KEPT:
            _HASHES.popitem(last=False)
    return cached


HASHES_KEPT = 64  # the most recently used
_HASHES: collections.OrderedDict[tuple[str, int, int], str] = collections.OrderedDict()
_HASHES_LOCK = threading.Lock()


def load_package(location: str | os.PathLike[str], *, overrides: dict[str, Any] | None = None) -> ModelPackage:
    """Read, validate and checksum a model package or MONAI Bundle.

    Parameters
    ----------
    location
        A built-in model name (see :data:`BUILTIN_MODELS`) or a folder.
    overrides
        Manifest fields that replace the package's own (deep-merged), e.g.
        ``{"output": {"labels": [...]}}``; for a bundle also ``sha256``.

    Returns
    -------
    ModelPackage

    Raises
    ------
    ModelError
        Missing folder, manifest or weights, a manifest that does not
        validate (the key is named), or weights whose SHA-256 differs.
    """
    text = os.fspath(location)
    root = BUILTIN_MODELS.get(text, Path(text)).expanduser()
    if not root.is_dir():
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ModelError(f"model {text!r}: no such folder (built-in models: {known})")
    overrides = dict(overrides or {})
    bundle_config = None
    if (root / MANIFEST_NAME).is_file():
        try:
            raw = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"model {text!r}: cannot read {MANIFEST_NAME}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelError(f"model {text!r}: {MANIFEST_NAME} is not a JSON object")
    elif (root / "configs" / "metadata.json").is_file():
        raw, bundle_config = _bundle_manifest(root, overrides)
    else:
        raise ModelError(f"model {text!r}: neither {MANIFEST_NAME} nor configs/metadata.json (a MONAI Bundle) found")
    overrides.pop("sha256", None)
    manifest = _validate(text, _merge(raw, overrides))
    weights_path = root / manifest.weights.file
    if not weights_path.is_file():
        raise ModelError(f"model {manifest.name}: weights file {manifest.weights.file} is missing")
    actual = sha256_of(weights_path)
    if actual != manifest.weights.sha256:
        raise ModelError(
            f"model {manifest.name}: SHA-256 of {manifest.weights.file} is {actual}, "
            f"the manifest states {manifest.weights.sha256}: wrong or damaged weights"
        )
    return ModelPackage(root=root, manifest=manifest, weights_path=weights_path, bundle_config=bundle_config)


def _validate(name: str, raw: dict[str, Any]) -> Manifest:
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ModelError(f"model {name!r}: manifest key {where}: {first['msg']}{more}") from exc


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _bundle_manifest(root: Path, overrides: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """A manifest dict from a MONAI Bundle's metadata, large_files and inference config."""
    try:
        meta = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"bundle {root.name}: cannot read configs/metadata.json: {exc}") from exc
    if not isinstance(meta, dict):
        raise ModelError(f"bundle {root.name}: configs/metadata.json is not a JSON object")
    models = root / "models"
    if (models / "model.ts").is_file():
        file, fmt, config = "models/model.ts", "torchscript", None
    elif (models / "model.pt").is_file():
        file, fmt = "models/model.pt", "state_dict"
        config = next(
            (c for c in (root / "configs").glob("inference.*") if c.suffix in (".json", ".yaml", ".yml")), None
        )
        if config is None:
            raise ModelError(f"bundle {root.name}: models/model.pt needs configs/inference.json with network_def")
    else:
        raise ModelError(f"bundle {root.name}: weights file models/model.ts or models/model.pt is missing")
    sha = overrides.get("sha256") or _bundle_sha256(root, file)
    if not sha:
        raise ModelError(
            f"bundle {root.name}: no SHA-256 for {file}: give params.model_overrides.sha256 "
            f"(large_files lists none of type sha256)"
        )
    fmt_data = meta.get("network_data_format", {}) if isinstance(meta.get("network_data_format"), dict) else {}
    image = (fmt_data.get("inputs") or {}).get("image") or {}
    pred = (fmt_data.get("outputs") or {}).get("pred") or {}
    spatial = [s for s in image.get("spatial_shape", []) if isinstance(s, int)]
    dims = "3d" if len(image.get("spatial_shape", [])) == 3 else "2d"
    channel_def = pred.get("channel_def") or {}
    n_out = int(pred.get("num_channels", 1) or 1)
    labels = [
        {"value": int(k), "name": str(v)[:48]}
        for k, v in sorted(channel_def.items(), key=lambda kv: int(kv[0]))
        if str(k).isdigit() and int(k) > 0
    ]
    raw: dict[str, Any] = {
        "name": re.sub(r"[^A-Za-z0-9._-]+", "-", str(meta.get("name") or root.name)).strip("-._")[:64] or "bundle",
        "version": str(meta.get("version", "0"))[:32],
        "description": str(meta.get("description", "")),
        "weights": {"file": file, "format": fmt, "sha256": sha},
        "architecture": {"name": f"network_def of configs/{config.name}"} if config is not None else None,
        "input": {
            "modality": ["CT", "MR"],
            "dims": dims,
            "channels": int(image.get("num_channels", 1) or 1),
            "roi_size": spatial if dims == "3d" and len(spatial) == 3 else None,
        },
        "output": {
            "kind": "segmentation",
            "activation": "softmax" if n_out > 1 else "sigmoid",
            "labels": labels,
        },
    }
    return raw, config


def _bundle_sha256(root: Path, file: str) -> str | None:
    """The sha256 that a bundle's large_files.{yml,yaml,json} states for ``file``, if any."""
    for name in ("large_files.yml", "large_files.yaml", "large_files.json"):
        path = root / name
        if not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                data = json.loads(path.read_text(encoding="utf-8"))
            else:
                import yaml

                data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except Exception as exc:
            raise ModelError(f"bundle {root.name}: cannot read {name}: {exc}") from exc
        for entry in (data or {}).get("large_files", []) if isinstance(data, dict) else []:
            if (
                isinstance(entry, dict)
                and Path(str(entry.get("path", ""))).as_posix().lstrip("./") == file
                and str(entry.get("hash_type", "")).lower() == "sha256"
            ):
                return str(entry.get("hash_val", "")).lower() or None
    return None


def _network_class(name: str) -> type:
    import importlib

    if ":" in name:
        module_name, _, attr = name.partition(":")
    else:
        module_name, attr = "monai.networks.nets", name
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"architecture {name!r} not found: {_short(exc)}") from exc
    if not isinstance(cls, type):
        raise ModelError(f"architecture {name!r} is not a class")
    return cls


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) < 300 else line[:297] + "..."
