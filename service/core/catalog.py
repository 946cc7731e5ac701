"""The layer catalog: a TOML file of ``[[layer]]`` and ``[[model]]`` entries -> layer specs.

    [[layer]]                       one layer; constructor arguments as torch.nn names them
    name = "stem.bn"
    kind = "BatchNorm2d"
    num_features = 64
    momentum = 0.1                  # or "cumulative" for momentum=None
    checkpoint = "resnet.safetensors"   # optional, relative to the catalog's folder
    prefix = "layer1.0.bn1."
    device = "cuda"                 # optional per-layer override
    drift_threshold = 0.5           # optional: count and log eval batches scoring over it

    [[model]]                       every BatchNorm-family layer of a whole-model checkpoint
    checkpoint = "resnet18.pt"
    name_prefix = "resnet18."       # layer names become name_prefix + module path
    kind = "BatchNorm2d"            # optional: the class to serve them as (default)
    drift_threshold = 0.5           # optional, for each of them

    [[model]]                       a model made of [[layer]] entries declared in the file
    name_prefix = "digits."         # how clients and GET /models/{name_prefix} name it
    [model.layers]                  # module path in the model -> served layer
    "features.1" = "digits.bn1"

Either form of ``[[model]]`` tells which module of a whole model each layer serves
(``LayerSpec.model`` and ``LayerSpec.module``): that is how a client attaches a local model
and how a model's adapted state is exported under its module paths.

Anything wrong stops loading with one ``CatalogError`` naming the file and the entry.
"""

from __future__ import annotations

import inspect
import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

import normcore
from normcore.checkpoint import find_norm_layers, load_layer_state, load_state_dict
from normcore.errors import CheckpointError, NormcoreError

from .devices import DEVICE, DEVICE_HELP
from .errors import NAME, shown

KINDS = (
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm",
)
_LAYER_KEYS = {"name", "kind", "checkpoint", "prefix", "device", "drift_threshold"}
_MODEL_KEYS = {"checkpoint", "name_prefix", "kind", "device", "eps", "momentum",
               "drift_threshold"}
# A module path as torch names submodules: attribute names and indices joined by dots.
MODULE_PATH = re.compile(r"^[A-Za-z0-9_]{1,64}(\.[A-Za-z0-9_]{1,64}){0,31}\Z")


class CatalogError(Exception):
    """The catalog cannot be loaded; the message names the file and the entry."""


@dataclass
class LayerSpec:
    """What it takes to build one served layer."""

    name: str
    kind: str
    kwargs: dict[str, Any]
    checkpoint: Path | None = None
    prefix: str = ""
    device: str | None = None
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    drift_threshold: float | None = None  # drift score that counts as a crossing
    model: str | None = None  # the name_prefix of the [[model]] this layer belongs to
    module: str = ""  # its module path in that model, e.g. "layer1.0.bn1"

    def build(self, device: torch.device) -> torch.nn.Module:
        """The layer with its checkpoint's state, in eval mode, on its device."""
        layer = make_layer(self.kind, self.kwargs)
        if self.state is not None:
            load_layer_state(layer, self.state, self.prefix, source=str(self.checkpoint))
        return layer.to(self.device or device).eval()


def constructor_args(kind: str) -> list[str]:
    """The constructor argument names a kind accepts (torch.nn's), minus device/dtype."""
    params = inspect.signature(getattr(normcore, kind)).parameters
    return [p for p in params if p not in ("device", "dtype")]


def _positive_int(v: Any) -> bool:
    return type(v) is int and 0 < v <= 1 << 24


def _shape(v: Any) -> bool:
    return _positive_int(v) or (isinstance(v, list) and 0 < len(v) <= 8
                                and all(map(_positive_int, v)) and math.prod(v) <= 1 << 24)


def _number(v: Any) -> bool:
    return type(v) in (int, float) and 0 < v < 1e3


# What each constructor argument may be; torch itself checks few of these.
_ARG_CHECKS: dict[str, tuple[Any, str]] = {
    "num_features": (_positive_int, "a positive integer"),
    "num_channels": (_positive_int, "a positive integer"),
    "num_groups": (_positive_int, "a positive integer"),
    "normalized_shape": (_shape, "a positive integer or a list of them"),
    "eps": (_number, "a positive number"),
    "momentum": (lambda v: v == "cumulative" or (type(v) in (int, float) and 0 <= v <= 1),
                 'a number in [0, 1] or "cumulative"'),
    "affine": (lambda v: type(v) is bool, "true or false"),
    "track_running_stats": (lambda v: type(v) is bool, "true or false"),
    "elementwise_affine": (lambda v: type(v) is bool, "true or false"),
    "bias": (lambda v: type(v) is bool, "true or false"),
}


def check_drift_threshold(value: Any) -> float | None:
    """A drift threshold as given (None: none); ValueError unless a positive number."""
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 < value < math.inf:
        raise ValueError("drift_threshold must be a positive number")
    return float(value)


def layer_width(kind: str, kwargs: dict[str, Any]) -> int:
    """How many values per position a layer of ``kind`` holds (channels, or normalized
    elements), read from arguments that ``check_arguments`` accepted."""
    for name in ("num_features", "num_channels"):
        if name in kwargs:
            return kwargs[name]
    shape = kwargs.get("normalized_shape", 1)
    return math.prod(shape) if isinstance(shape, list) else shape


def make_layer(kind: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """Build a layer from its kind and torch.nn-named arguments; ValueError if invalid."""
    check_arguments(kind, kwargs)
    args = dict(kwargs)
    if args.get("momentum") == "cumulative":
        args["momentum"] = None
    try:
        return getattr(normcore, kind)(**args)
    except (TypeError, ValueError, RuntimeError, NormcoreError) as exc:
        raise ValueError(f"invalid arguments for {kind}: {exc}") from None


def check_arguments(kind: str, kwargs: dict[str, Any]) -> None:
    """``ValueError`` naming the problem unless ``kind(**kwargs)`` is a layer to build."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind '{shown(kind)}'; expected one of {', '.join(KINDS)}")
    unknown = set(kwargs) - set(constructor_args(kind))
    if unknown:
        names = ", ".join(sorted({shown(name) for name in unknown}))
        raise ValueError(f"unknown argument(s) for {kind}: {names}")
    for name, value in kwargs.items():
        check, expected = _ARG_CHECKS[name]
        if not (value is None and name == "eps" and kind == "RMSNorm") and not check(value):
            raise ValueError(f"invalid arguments for {kind}: {name} must be {expected}")


def layer_config(layer: torch.nn.Module, kind: str) -> dict[str, Any]:
    """The constructor arguments a layer was built with, as a catalog entry gives them
    (the inverse of ``make_layer``; JSON-ready)."""
    config: dict[str, Any] = {}
    for name in constructor_args(kind):
        value = getattr(layer, name, None)
        if name == "bias":  # LayerNorm's bias flag shares its name with the parameter
            value = value is not None
        elif name == "momentum" and value is None:
            value = "cumulative"
        elif isinstance(value, tuple):
            value = list(value)
        config[name] = value
    return config


def default_catalog() -> Path:
    """The catalog shipped inside the package."""
    return Path(str(resources.files("service") / "catalog" / "default.toml"))


def resolve_inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, refusing absolute paths and ``..`` escapes (symlinks too)."""
    candidate = Path(relative)
    if candidate.is_absolute():
        raise ValueError(f"checkpoint path {relative!r} must be relative to {folder}")
    root = folder.resolve()
    path = (root / candidate).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"checkpoint path {relative!r} escapes {folder}")
    return path


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.folder = path.parent
        self._files: dict[Path, dict[str, torch.Tensor]] = {}

    def fail(self, where: str, reason: str) -> CatalogError:
        return CatalogError(f"{self.path}: {where}: {reason}")

    def checkpoint(self, where: str, relative: Any) -> tuple[Path, dict[str, torch.Tensor]]:
        if not isinstance(relative, str):
            raise self.fail(where, "checkpoint must be a string path")
        try:
            path = resolve_inside(self.folder, relative)
            if path not in self._files:  # one read per file, however many layers use it
                self._files[path] = load_state_dict(path)
        except (ValueError, CheckpointError) as exc:
            raise self.fail(where, str(exc)) from None
        return path, self._files[path]

    def layer(self, index: int, entry: dict[str, Any]) -> LayerSpec:
        where = f"[[layer]] #{index + 1} ({entry.get('name', 'unnamed')})"
        name, kind = entry.get("name"), entry.get("kind")
        if not isinstance(name, str) or not NAME.match(name):
            raise self.fail(where, "name must match [A-Za-z0-9._-]+")
        if kind not in KINDS:
            raise self.fail(where, f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        kwargs = {k: v for k, v in entry.items() if k not in _LAYER_KEYS}
        spec = LayerSpec(name, kind, kwargs, prefix=entry.get("prefix", ""),
                         device=entry.get("device"),
                         drift_threshold=self.threshold(where, entry))
        if "checkpoint" in entry:
            spec.checkpoint, spec.state = self.checkpoint(where, entry["checkpoint"])
        elif "prefix" in entry:
            raise self.fail(where, "prefix given without a checkpoint")
        self.check(where, spec)
        return spec

    def model(self, index: int, entry: dict[str, Any]) -> list[LayerSpec]:
        if "layers" in entry:
            return []  # made of [[layer]] entries: see ``group``, once every layer is known
        where = f"[[model]] #{index + 1} ({entry.get('checkpoint', 'no checkpoint')})"
        unknown = set(entry) - _MODEL_KEYS
        if unknown:
            raise self.fail(where, f"unknown key(s) {', '.join(sorted(unknown))}")
        if "checkpoint" not in entry:
            raise self.fail(where, "checkpoint is required")
        kind = entry.get("kind", "BatchNorm2d")
        if kind not in KINDS or not kind.startswith(("BatchNorm", "InstanceNorm")):
            raise self.fail(where, f"kind must be a BatchNorm or InstanceNorm class, not {kind!r}")
        path, state = self.checkpoint(where, entry["checkpoint"])
        found = find_norm_layers(state)
        if not found:
            raise self.fail(where, f"{path} holds no layer with running statistics")
        specs = []
        name_prefix = entry.get("name_prefix", "")
        for layer in found:
            kwargs = {"num_features": layer.num_features, "affine": layer.affine}
            kwargs |= {k: entry[k] for k in ("eps", "momentum") if k in entry}
            if kind.startswith("InstanceNorm"):
                kwargs["track_running_stats"] = True
            spec = LayerSpec(f"{name_prefix}{layer.path}", kind, kwargs, path, layer.prefix,
                             entry.get("device"), state, self.threshold(where, entry),
                             model=name_prefix, module=layer.path)
            self.check(f"{where} layer {layer.path!r}", spec)
            specs.append(spec)
        return specs

    def threshold(self, where: str, entry: dict[str, Any]) -> float | None:
        try:
            return check_drift_threshold(entry.get("drift_threshold"))
        except ValueError as exc:
            raise self.fail(where, str(exc)) from None

    def group(self, index: int, entry: dict[str, Any], specs: dict[str, LayerSpec]) -> None:
        """Mark the [[layer]] entries a ``layers`` table names as modules of one model."""
        name_prefix = entry.get("name_prefix")
        where = f"[[model]] #{index + 1} ({shown(name_prefix)})"
        unknown = set(entry) - {"name_prefix", "layers"}
        if unknown:
            raise self.fail(where, f"unknown key(s) {', '.join(sorted(unknown))}: a model made "
                                   "of [[layer]] entries takes name_prefix and layers only")
        if not isinstance(name_prefix, str) or not NAME.match(name_prefix):
            raise self.fail(where, "name_prefix must match [A-Za-z0-9._-]+")
        layers = entry["layers"]
        if not isinstance(layers, dict) or not layers:
            raise self.fail(where, "layers must be a table of module path = layer name")
        for module, name in layers.items():
            if not MODULE_PATH.match(module):
                raise self.fail(where, f"{module!r} is not a module path (such as 'features.1')")
            spec = specs.get(name) if isinstance(name, str) else None
            if spec is None:
                raise self.fail(where, f"module {module!r}: no [[layer]] named {name!r}")
            if spec.model is not None:
                raise self.fail(where, f"layer {name!r} already serves module {spec.module!r} "
                                       f"of model {spec.model!r}")
            spec.model, spec.module = name_prefix, module

    def check(self, where: str, spec: LayerSpec) -> None:
        if not NAME.match(spec.name):
            raise self.fail(where, f"layer name {spec.name!r} must match [A-Za-z0-9._-]+")
        if spec.device is not None and not (isinstance(spec.device, str)
                                            and DEVICE.match(spec.device)):
            raise self.fail(where, f"device must be {DEVICE_HELP}, not {spec.device!r}")
        try:
            spec.build(torch.device("cpu")) if spec.state is not None else make_layer(
                spec.kind, spec.kwargs)
        except (ValueError, CheckpointError) as exc:
            raise self.fail(where, str(exc)) from None


def load_catalog(path: Path | None = None) -> list[LayerSpec]:
    """Parse and check a catalog (the built-in one if ``path`` is None)."""
    path = Path(path) if path is not None else default_catalog()
    loader = _Loader(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: not valid TOML ({exc})") from None
    unknown = set(document) - {"layer", "model"}
    if unknown:
        raise CatalogError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    specs: list[LayerSpec] = []
    for i, entry in enumerate(document.get("layer", [])):
        specs.append(loader.layer(i, entry))
    for i, entry in enumerate(document.get("model", [])):
        specs.extend(loader.model(i, entry))
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise CatalogError(f"{path}: layer name {spec.name!r} is used twice")
        seen.add(spec.name)
    by_name = {spec.name: spec for spec in specs}
    for i, entry in enumerate(document.get("model", [])):
        if "layers" in entry:
            loader.group(i, entry, by_name)
    modules: set[tuple[str, str]] = set()
    for spec in specs:
        if spec.model is not None and (spec.model, spec.module) in modules:
            raise CatalogError(f"{path}: model {spec.model!r} has two layers for module "
                               f"{spec.module!r}")
        modules.add((spec.model, spec.module))
    return specs


def models_of(specs: list[LayerSpec]) -> dict[str, dict[str, str]]:
    """Each model's layers by module path: ``{name_prefix: {module path: layer name}}``."""
    models: dict[str, dict[str, str]] = {}
    for spec in specs:
        if spec.model is not None:
            models.setdefault(spec.model, {})[spec.module] = spec.name
    return models
