"""The table of layer configurations that drives the parity checks.

Each case names a family, constructor arguments and the input shapes to feed it; the
same table runs against torch.nn on every device present.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

import normcore


@dataclass(frozen=True)
class Case:
    kind: str
    kwargs: dict = field(hash=False)
    shapes: tuple[tuple[int, ...], ...]

    @property
    def id(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.kind}({args})-{'|'.join('x'.join(map(str, s)) for s in self.shapes)}"

    def build(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        return getattr(normcore, self.kind)(**self.kwargs), getattr(torch.nn, self.kind)(
            **self.kwargs
        )


def _running_cases() -> list[Case]:
    cases = []
    shapes = {
        "BatchNorm1d": [((6, 5),), ((4, 5, 7),)],
        "BatchNorm2d": [((4, 5, 3, 6),), ((2, 5, 1, 3),)],
        "BatchNorm3d": [((2, 5, 3, 2, 4),)],
        "InstanceNorm1d": [((4, 5, 7),), ((5, 9),)],
        "InstanceNorm2d": [((3, 5, 4, 6),), ((5, 3, 3),)],
        "InstanceNorm3d": [((2, 5, 3, 2, 4),)],
    }
    grid = itertools.product([0.1, 0.5, None], [True, False], [True, False], [1e-5, 1e-2])
    for momentum, affine, track, eps in grid:
        for kind, shape_sets in shapes.items():
            for shapes_ in shape_sets:
                kwargs = {
                    "num_features": 5, "eps": eps, "momentum": momentum, "affine": affine,
                    "track_running_stats": track,
                }
                cases.append(Case(kind, kwargs, shapes_))
    return cases


def _last_dim_cases() -> list[Case]:
    cases = []
    shapes = [((7,), (3, 7)), ((4, 7),), ((2, 3, 7),), ((2, 3, 4, 7),), ((2, 2, 3, 4, 7),)]
    for shape_set, (affine, bias), eps in itertools.product(
        shapes, [(True, True), (True, False), (False, True)], [1e-5, 1e-3]
    ):
        cases.append(
            Case("LayerNorm", {"normalized_shape": [7], "eps": eps,
                               "elementwise_affine": affine, "bias": bias}, shape_set)
        )
    cases.append(Case("LayerNorm", {"normalized_shape": [3, 7]}, ((2, 3, 7), (5, 2, 3, 7))))
    for shape_set, affine, eps in itertools.product(shapes, [True, False], [None, 1e-6]):
        cases.append(
            Case("RMSNorm", {"normalized_shape": [7], "eps": eps, "elementwise_affine": affine},
                 shape_set)
        )
    cases.append(Case("RMSNorm", {"normalized_shape": (3, 7)}, ((4, 3, 7),)))
    return cases


def _group_cases() -> list[Case]:
    cases = []
    shapes = [((4, 6),), ((3, 6, 5),), ((2, 6, 3, 4),), ((2, 6, 2, 3, 2),)]
    for shape_set, groups, affine, eps in itertools.product(
        shapes, [1, 2, 3, 6], [True, False], [1e-5, 1e-3]
    ):
        if groups == 6 and shape_set[0] == (4, 6):
            continue  # one value per group: torch refuses it too (tested separately)
        cases.append(
            Case("GroupNorm", {"num_groups": groups, "num_channels": 6, "eps": eps,
                               "affine": affine}, shape_set)
        )
    return cases


CASES = _running_cases() + _last_dim_cases() + _group_cases()
