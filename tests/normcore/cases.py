"""The table that drives the normcore tests: family × options × dtype × mode, with the
tolerances each dtype is held to.

A ``Case`` is one layer configuration (a torch.nn class name and its constructor
arguments) with the input shapes to feed it. A ``Precision`` is an input dtype and how
close to torch its results must be. Modes are train and eval, for the families where they
differ. ``rows`` crosses the three (and devices, CUDA ones as ``skipif`` parameters) into
pytest parameters, so every suite runs the same table on CPU-only CI:

    CASES            the option grid of every family, float32
    FUNCTIONAL_CASES the part of it that differs to torch.nn.functional
    PER_KIND         one configuration per class, for the other dtypes and per-class checks
    TOO_FEW_VALUES   one value per channel, instance or group: torch refuses to train on it
    MISMATCHED       inputs or arguments that do not fit the layer: torch raises
    EMPTY            empty inputs of every family
    EDGES, LARGE, CHANNELS_LAST   the boundaries of the fused kernels' loops
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest
import torch

import normcore
from tests.conftest import DEVICES

MODES = ("train", "eval")
RUNNING_FAMILIES = ("BatchNorm", "InstanceNorm")


# --- dtypes and tolerances -----------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """An input dtype and its tolerances against torch: ``atol``/``rtol`` for outputs,
    ``state_tol`` (absolute and relative) for running statistics, which torch updates
    partly in the input's precision."""

    dtype: torch.dtype
    atol: float
    rtol: float
    state_tol: float

    @property
    def id(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def reduced(self) -> bool:
        return self.dtype in (torch.float16, torch.bfloat16)

    @property
    def state_dtype(self) -> torch.dtype:
        """Of parameters, buffers and returned statistics: float32 under half inputs, as in
        mixed-precision training, else the input's."""
        return torch.float32 if self.reduced else self.dtype

    def assert_close(self, got: torch.Tensor, want: torch.Tensor, msg: str | None = None) -> None:
        torch.testing.assert_close(got, want, atol=self.atol, rtol=self.rtol, msg=msg)

    def assert_same_state(self, ours: torch.nn.Module, ref: torch.nn.Module) -> None:
        """Same state dict keys, dtypes and values (NaN where torch has NaN)."""
        ours_state, ref_state = ours.state_dict(), ref.state_dict()
        assert ours_state.keys() == ref_state.keys()
        for key, value in ref_state.items():
            torch.testing.assert_close(ours_state[key], value, atol=self.state_tol,
                                       rtol=self.state_tol, equal_nan=True, msg=key)


FLOAT32 = Precision(torch.float32, atol=1e-5, rtol=0, state_tol=1e-5)
FLOAT64 = Precision(torch.float64, atol=1e-10, rtol=0, state_tol=1e-10)
FLOAT16 = Precision(torch.float16, atol=2e-2, rtol=1e-2, state_tol=1e-2)
BFLOAT16 = Precision(torch.bfloat16, atol=2e-2, rtol=1e-2, state_tol=1e-2)
PRECISIONS = (FLOAT32, FLOAT64, FLOAT16, BFLOAT16)
OTHER_PRECISIONS = (FLOAT64, FLOAT16, BFLOAT16)


# --- layer configurations ------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A torch.nn class name, its constructor arguments and the input shapes to feed it."""

    kind: str
    kwargs: dict = field(hash=False)
    shapes: tuple[tuple[int, ...], ...]

    @property
    def id(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.kind}({args})-{'|'.join('x'.join(map(str, s)) for s in self.shapes)}"

    @property
    def family(self) -> str:
        """The class name without its rank: BatchNorm, InstanceNorm, LayerNorm, ..."""
        return re.sub(r"[123]d$", "", self.kind)

    @property
    def modes(self) -> tuple[str, ...]:
        """Train and eval for BatchNorm and InstanceNorm; the others have one behaviour."""
        return MODES if self.family in RUNNING_FAMILIES else ("train",)

    @property
    def tracks_running_stats(self) -> bool:
        """True where train and eval mode normalize differently."""
        default = self.family == "BatchNorm"
        return self.family in RUNNING_FAMILIES and self.kwargs.get("track_running_stats",
                                                                    default)

    def reference(self, precision: Precision = FLOAT32, device: str = "cpu") -> torch.nn.Module:
        """The torch.nn layer, with random parameters and running statistics."""
        ref = getattr(torch.nn, self.kind)(**self.kwargs)
        with torch.no_grad():
            for name, tensor in ref.state_dict().items():
                if name.endswith("running_var"):
                    tensor.copy_(torch.rand_like(tensor) + 0.5)
                elif name.endswith("num_batches_tracked"):
                    tensor.fill_(3)
                elif tensor.is_floating_point():
                    tensor.copy_(torch.randn_like(tensor))
        return ref.to(device=device, dtype=precision.state_dtype)

    def pair(self, precision: Precision = FLOAT32, device: str = "cpu"
             ) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(normcore layer, torch.nn layer) with the same random state."""
        ref = self.reference(precision, device)
        ours = getattr(normcore, self.kind)(**self.kwargs).to(device=device,
                                                               dtype=precision.state_dtype)
        ours.load_state_dict(ref.state_dict())
        return ours, ref

    def functional_call(self, layer: torch.nn.Module, mode: str) -> tuple[str, list, dict]:
        """torch.nn.functional's name and arguments (after the input) for this family in
        ``mode``, with copies of ``layer``'s tensors: weight and bias where it is affine,
        running statistics where it tracks them."""

        def copy(name: str) -> torch.Tensor | None:
            tensor = getattr(layer, name, None)
            return None if tensor is None else tensor.detach().clone()

        eps = {"eps": layer.eps}
        if self.family == "LayerNorm":
            return "layer_norm", [list(layer.normalized_shape), copy("weight"), copy("bias")], eps
        if self.family == "RMSNorm":
            return "rms_norm", [list(layer.normalized_shape), copy("weight")], eps
        if self.family == "GroupNorm":
            return "group_norm", [layer.num_groups, copy("weight"), copy("bias")], eps
        momentum = layer.momentum
        if momentum is None:  # what torch.nn passes: BatchNorm's cumulative factor, or 0
            tracked = copy("num_batches_tracked")
            batch_norm = self.family == "BatchNorm" and tracked is not None
            momentum = 1.0 / (int(tracked) + 1) if batch_norm else 0.0
        name, flag = (("batch_norm", "training") if self.family == "BatchNorm"
                      else ("instance_norm", "use_input_stats"))
        args = [copy("running_mean"), copy("running_var"), copy("weight"), copy("bias")]
        return name, args, {flag: mode == "train", "momentum": momentum, **eps}


def _running_cases() -> list[Case]:
    shapes = {
        "BatchNorm1d": [((6, 5),), ((4, 5, 7),)],
        "BatchNorm2d": [((4, 5, 3, 6),), ((2, 5, 1, 3),)],
        "BatchNorm3d": [((2, 5, 3, 2, 4),)],
        "InstanceNorm1d": [((4, 5, 7),), ((5, 9),)],
        "InstanceNorm2d": [((3, 5, 4, 6),), ((5, 3, 3),)],
        "InstanceNorm3d": [((2, 5, 3, 2, 4),)],
    }
    grid = itertools.product([0.1, 0.5, None], [True, False], [True, False], [1e-5, 1e-2])
    return [
        Case(kind, {"num_features": 5, "eps": eps, "momentum": momentum, "affine": affine,
                    "track_running_stats": track}, shape_set)
        for momentum, affine, track, eps in grid
        for kind, shape_sets in shapes.items()
        for shape_set in shape_sets
    ]


def _last_dim_cases() -> list[Case]:
    shapes = [((7,), (3, 7)), ((4, 7),), ((2, 3, 7),), ((2, 3, 4, 7),), ((2, 2, 3, 4, 7),)]
    cases = [
        Case("LayerNorm", {"normalized_shape": [7], "eps": eps, "elementwise_affine": affine,
                           "bias": bias}, shape_set)
        for shape_set, (affine, bias), eps in itertools.product(
            shapes, [(True, True), (True, False), (False, True)], [1e-5, 1e-3])
    ]
    cases.append(Case("LayerNorm", {"normalized_shape": [3, 7]}, ((2, 3, 7), (5, 2, 3, 7))))
    cases += [
        Case("RMSNorm", {"normalized_shape": [7], "eps": eps, "elementwise_affine": affine},
             shape_set)
        for shape_set, affine, eps in itertools.product(shapes, [True, False], [None, 1e-6])
    ]
    cases.append(Case("RMSNorm", {"normalized_shape": (3, 7)}, ((4, 3, 7),)))
    return cases


def _group_cases() -> list[Case]:
    shapes = [((4, 6),), ((3, 6, 5),), ((2, 6, 3, 4),), ((2, 6, 2, 3, 2),)]
    return [
        Case("GroupNorm", {"num_groups": groups, "num_channels": 6, "eps": eps,
                           "affine": affine}, shape_set)
        for shape_set, groups, affine, eps in itertools.product(
            shapes, [1, 2, 3, 6], [True, False], [1e-5, 1e-3])
        # One value per group: torch refuses it too (TOO_FEW_VALUES).
        if not (groups == 6 and shape_set[0] == (4, 6))
    ]


CASES = _running_cases() + _last_dim_cases() + _group_cases()

# To torch.nn.functional, eps and momentum are plain numbers: one eps other than the
# default (so a dropped eps shows) and momentum 0.1 or None (which the layers turn into
# another number) cover its code; the layers' parity runs every value through it too.
FUNCTIONAL_CASES = [
    c for c in CASES if c.kwargs.get("eps") != 1e-5 and c.kwargs.get("momentum") != 0.5
]

PER_KIND = [
    Case("BatchNorm1d", {"num_features": 4, "momentum": None}, ((16, 4),)),
    Case("BatchNorm2d", {"num_features": 4}, ((8, 4, 5, 5),)),
    Case("BatchNorm3d", {"num_features": 4}, ((2, 4, 2, 3, 2),)),
    Case("InstanceNorm1d", {"num_features": 4, "affine": True, "track_running_stats": True},
         ((2, 4, 6),)),
    Case("InstanceNorm2d", {"num_features": 4, "track_running_stats": True}, ((3, 4, 5, 5),)),
    Case("InstanceNorm3d", {"num_features": 4, "track_running_stats": True},
         ((2, 4, 2, 3, 2),)),
    Case("LayerNorm", {"normalized_shape": [32]}, ((6, 32),)),
    Case("GroupNorm", {"num_groups": 2, "num_channels": 4}, ((3, 4, 9),)),
    Case("RMSNorm", {"normalized_shape": [32]}, ((6, 32),)),
]

TOO_FEW_VALUES = [
    Case("BatchNorm1d", {"num_features": 4}, ((1, 4),)),
    Case("BatchNorm2d", {"num_features": 4}, ((1, 4, 1, 1),)),
    Case("InstanceNorm1d", {"num_features": 4, "track_running_stats": True}, ((3, 4, 1),)),
    Case("GroupNorm", {"num_groups": 4, "num_channels": 4}, ((1, 4),)),
]

MISMATCHED = [
    Case("BatchNorm1d", {"num_features": 4}, ((4, 3),)),  # running statistics of 4
    Case("BatchNorm1d", {"num_features": 1}, ((4, 3),)),
    Case("InstanceNorm1d", {"num_features": 2, "track_running_stats": True}, ((4, 3, 5),)),
    Case("InstanceNorm1d", {"num_features": 4, "affine": True}, ((3, 5, 2),)),
    Case("GroupNorm", {"num_groups": 4, "num_channels": 4}, ((4, 6, 5),)),  # 6 % 4
    Case("GroupNorm", {"num_groups": 2, "num_channels": 4}, ((3, 6, 2), (6,))),
    Case("LayerNorm", {"normalized_shape": [5]}, ((4, 3),)),
    Case("RMSNorm", {"normalized_shape": [5]}, ((4, 3),)),
    Case("RMSNorm", {"normalized_shape": [2, 5]}, ((3, 5, 2),)),
    Case("BatchNorm1d", {"num_features": 5}, ((5,),)),  # no channel dim
    Case("InstanceNorm1d", {"num_features": 5, "track_running_stats": True}, ((5,),)),
]


def _empty_cases() -> list[Case]:
    shapes = {
        "BatchNorm1d": ((0, 3), (0, 3, 5), (4, 3, 0)),
        "BatchNorm2d": ((0, 3, 2, 2), (2, 3, 0, 4)),
        "BatchNorm3d": ((0, 3, 2, 2, 2),),
        "InstanceNorm1d": ((0, 3, 5), (4, 3, 0), (1, 3, 0)),
        "InstanceNorm2d": ((0, 3, 2, 2), (2, 3, 0, 4)),
        "InstanceNorm3d": ((0, 3, 2, 2, 2),),
    }
    cases = [
        Case(kind, {"num_features": 3, "affine": affine, "track_running_stats": track}, shape_set)
        for kind, shape_set in shapes.items()
        for affine, track in itertools.product([True, False], repeat=2)
    ]
    return cases + [
        Case("BatchNorm1d", {"num_features": 0, "affine": False}, ((4, 0), (4, 0, 5))),
        Case("BatchNorm1d", {"num_features": 0}, ((4, 0),)),
        Case("LayerNorm", {"normalized_shape": [5]}, ((0, 5), (0, 3, 5))),
        Case("LayerNorm", {"normalized_shape": [0], "elementwise_affine": False}, ((4, 0),)),
        Case("RMSNorm", {"normalized_shape": [5]}, ((0, 5), (0, 3, 5))),
        Case("RMSNorm", {"normalized_shape": [0], "elementwise_affine": False}, ((4, 0),)),
        Case("GroupNorm", {"num_groups": 3, "num_channels": 6}, ((0, 6, 5), (4, 6, 0), (0, 6))),
        Case("GroupNorm", {"num_groups": 3, "num_channels": 6, "affine": False}, ((0, 6, 5),)),
    ]


EMPTY = _empty_cases()

EDGES = [  # each one a boundary of the kernels' loops
    Case("BatchNorm1d", {"num_features": 3}, ((2, 3),)),  # two values per channel
    Case("BatchNorm2d", {"num_features": 3}, ((1, 3, 1, 2),)),  # two values, one sample
    Case("BatchNorm1d", {"num_features": 1}, ((64, 1),)),  # C = 1
    Case("BatchNorm2d", {"num_features": 1}, ((4, 1, 16, 16),)),  # C = 1, planes
    Case("BatchNorm1d", {"num_features": 5000}, ((8, 5000),)),  # huge C, as columns
    Case("BatchNorm2d", {"num_features": 2048}, ((2, 2048, 8, 8),)),  # huge C, as planes
    Case("BatchNorm1d", {"num_features": 37}, ((3000, 37, 3),)),  # odd widths, many chunks
    # Rows narrower than a few vectors, read several at a time, then a tail of fewer rows
    Case("BatchNorm1d", {"num_features": 8}, ((37, 8),)),
    Case("BatchNorm1d", {"num_features": 8}, ((8, 8),)),  # one folded row, no tail
    Case("BatchNorm1d", {"num_features": 10}, ((45, 10),)),
    Case("BatchNorm1d", {"num_features": 24}, ((50, 24),)),
    Case("BatchNorm2d", {"num_features": 3}, ((2, 3, 300, 300),)),  # planes split in pieces
    Case("LayerNorm", {"normalized_shape": [300_000]}, ((1, 300_000),)),  # one row, split
    Case("LayerNorm", {"normalized_shape": [3]}, ((5000, 3),)),  # rows shorter than a vector
    Case("LayerNorm", {"normalized_shape": [4, 5], "bias": False}, ((7, 4, 5),)),
    Case("RMSNorm", {"normalized_shape": [200_000]}, ((2, 200_000),)),  # two long rows
    Case("GroupNorm", {"num_groups": 1, "num_channels": 4}, ((1, 4, 200, 200),)),  # one group
    Case("GroupNorm", {"num_groups": 3, "num_channels": 6}, ((2, 6),)),  # no spatial dims
    Case("InstanceNorm2d", {"num_features": 3, "affine": True, "track_running_stats": True},
         ((2, 3, 300, 300),)),
    Case("InstanceNorm1d", {"num_features": 2, "track_running_stats": True}, ((3, 2, 2),)),
]

LARGE = [  # enough work to split across threads
    Case("BatchNorm2d", {"num_features": 16}, ((8, 16, 64, 64),)),
    Case("LayerNorm", {"normalized_shape": [1024]}, ((2048, 1024),)),
    Case("GroupNorm", {"num_groups": 4, "num_channels": 16}, ((8, 16, 64, 64),)),
]

CHANNELS_LAST = [
    Case("BatchNorm2d", {"num_features": 8}, ((4, 8, 5, 6),)),
    Case("BatchNorm2d", {"num_features": 3}, ((3, 3, 5, 7),)),  # rows of 3, folded, a tail
    Case("BatchNorm2d", {"num_features": 10}, ((2, 10, 3, 7),)),
    Case("BatchNorm3d", {"num_features": 8}, ((2, 8, 3, 4, 5),)),
]


# --- inputs a train step must refuse -------------------------------------------------------


def _with_value(shape: tuple[int, ...], value: float) -> torch.Tensor:
    x = torch.randn(shape)
    x.view(-1)[3] = value
    return x


BAD_TRAIN_INPUTS: dict[str, Callable[[tuple[int, ...]], torch.Tensor]] = {
    "wrong channel count": lambda s: torch.randn(s[0], s[1] + 1, *s[2:]),
    "wrong rank": lambda s: torch.randn(*s, 2, 2),
    "NaN": lambda s: _with_value(s, math.nan),
    "Inf": lambda s: _with_value(s, math.inf),
    "-Inf": lambda s: _with_value(s, -math.inf),
    "finite values whose variance overflows": lambda s: _with_value(s, 3e38),
    "integer dtype": lambda s: torch.ones(s, dtype=torch.long),
}


# --- rows: the table crossed into pytest parameters ----------------------------------------


@dataclass(frozen=True)
class Row:
    """One parity check: a case in a dtype, a mode (where it matters) and on a device."""

    case: Case
    precision: Precision = FLOAT32
    mode: str | None = None
    device: str = "cpu"

    @property
    def id(self) -> str:
        parts = [self.case.id, self.precision.id, self.mode, self.device]
        return "-".join(p for p in parts if p)

    def pair(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        return self.case.pair(self.precision, self.device)

    def input(self, shape: tuple[int, ...], scale: float = 1.0, shift: float = 0.0
              ) -> torch.Tensor:
        x = torch.randn(shape, device=self.device) * scale + shift
        return x.to(self.precision.dtype)


def rows(
    cases: Iterable[Case], *, precisions: Iterable[Precision] = (FLOAT32,),
    modes: bool = False, devices: Iterable[object] = ("cpu",),
) -> list:
    """Every case in every precision (and each of its modes, if ``modes``) on every device,
    as pytest parameters; a device given as ``pytest.param`` (DEVICES' CUDA) passes its
    marks on."""
    cases, params = list(cases), []
    for device in devices:
        name, marks = (device, ()) if isinstance(device, str) else (device.values[0],
                                                                     device.marks)
        for case, precision in itertools.product(cases, precisions):
            for mode in case.modes if modes else (None,):
                row = Row(case, precision, mode, name)
                params.append(pytest.param(row, marks=marks, id=row.id))
    return params


def parity_rows(
    *, devices: Iterable[object] = DEVICES, where: Callable[[Case], bool] = lambda case: True,
) -> list:
    """The option grid in float32 and one case per class in every other dtype, on every
    device; only the cases ``where`` keeps."""
    return (rows(filter(where, CASES), devices=devices)
            + rows(filter(where, PER_KIND), precisions=OTHER_PRECISIONS, devices=devices))
