"""Mutated checkpoints: thousands of damaged safetensors files through the loader.

Every file either raises CheckpointError or loads values a layer can serve: finite,
``running_var >= 0``, ``num_batches_tracked >= 0``, the layer's shapes. Nothing else is
raised, and a refused file leaves the layer exactly as it was. The mutations are
seeded, so a run is repeatable:

* byte-level: flipped bits, overwritten, inserted and deleted bytes, truncations and
  extensions, aimed at the header or at the bytes of the norm layers' tensors;
* header-level: the JSON header decoded, one entry's dtype, shape, offsets or key
  changed, and the file put back together (with the right or a wrong header length);
* value-level: one tensor replaced by another dtype holding extreme values.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import normcore
from normcore.checkpoint import load_layer_state, load_state_dict, load_state_dict_bytes
from normcore.errors import CheckpointError

DIGITS = Path(__file__).resolve().parents[2] / "service" / "catalog" / "digits_cnn.safetensors"
# The norm layers of the digits CNN, as the default catalog serves them.
DIGITS_LAYERS = [
    ("features.1.", normcore.BatchNorm2d, 16), ("features.4.", normcore.BatchNorm2d, 32),
    ("features.8.", normcore.BatchNorm2d, 64), ("head.2.", normcore.BatchNorm1d, 64),
]
SMALL_LAYERS = [("bn.", normcore.BatchNorm1d, 8), ("in.", normcore.InstanceNorm1d, 4)]
DTYPES = ["F16", "BF16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64",
          "BOOL", "F8_E4M3", "F8_E5M2", "C64", "XX"]
EXTREMES = [0.0, -0.0, 1.0, -1.0, 1e-45, 6e4, 7e4, 3.4e38, 3.5e38, 1e300, -1e300, -1e-300,
            float("nan"), float("inf"), -float("inf")]
FLOAT32_PATTERNS = [struct.pack("<f", v) for v in (-0.0, -1.0, 1e-45, 3.4e38, float("nan"),
                                                   float("inf"), -float("inf"))]


def _small_file() -> bytes:
    bn = torch.nn.BatchNorm1d(8)
    instance = torch.nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
    with torch.no_grad():
        bn(torch.randn(16, 8) * 3 + 1)
        instance(torch.randn(5, 4, 7))
    state = {f"bn.{k}": v for k, v in bn.state_dict().items()}
    state |= {f"in.{k}": v for k, v in instance.state_dict().items()}
    return safetensors.torch.save(state, metadata={"kind": "test"})


def _header(data: bytes) -> tuple[dict, int]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), 8 + size


def _with_header(header: dict, body: bytes, rng: np.random.Generator) -> bytes:
    text = json.dumps(header).encode()
    size = len(text) + int(rng.choice([0, 0, 0, -1, 1, 8, -8, 1 << 40]))
    return struct.pack("<Q", size % (1 << 64)) + text + body


def _byte_mutation(data: bytes, targets: list[tuple[int, int]], rng) -> bytes:
    out = bytearray(data)
    header_end = _header(data)[1]
    for _ in range(int(rng.integers(1, 4))):
        where = rng.random()
        if where < 0.4:
            lo, hi = 0, header_end
        elif where < 0.9:
            lo, hi = targets[int(rng.integers(len(targets)))]
        else:
            lo, hi = 0, len(out)
        if not out:
            break
        i = int(rng.integers(lo, max(lo + 1, min(hi, len(out)))))
        i = min(i, len(out) - 1)
        op = int(rng.integers(7))
        if op == 0:
            out[i] ^= 1 << int(rng.integers(8))
        elif op == 1:
            out[i] = int(rng.integers(256))
        elif op == 2:
            out[i:i] = rng.bytes(int(rng.integers(1, 9)))
        elif op == 3:
            del out[i:i + int(rng.integers(1, 9))]
        elif op == 4:
            del out[i:]
        elif op == 5:
            out += rng.bytes(int(rng.integers(1, 64)))
        else:  # an interesting 4-byte float where one was
            out[i:i + 4] = FLOAT32_PATTERNS[int(rng.integers(len(FLOAT32_PATTERNS)))]
    return bytes(out)


def _header_mutation(data: bytes, rng) -> bytes:
    header, end = _header(data)
    body = data[end:]
    keys = [k for k in header if k != "__metadata__"]
    key = keys[int(rng.integers(len(keys)))]
    entry = header[key]
    op = int(rng.integers(8))
    if op == 0:
        entry["dtype"] = str(rng.choice(DTYPES))
    elif op == 1:
        entry["shape"] = [int(d) for d in rng.integers(-2, 70, size=int(rng.integers(0, 4)))]
    elif op == 2:
        begin, stop = entry["data_offsets"]
        shift = int(rng.choice([-8, -4, -1, 1, 4, 8, 1 << 40]))
        entry["data_offsets"] = [begin + shift, stop + shift] if rng.random() < 0.5 else \
            [begin, stop + shift]
    elif op == 3:
        header[key.rsplit(".", 1)[0] + rng.choice([".running_var", ".running_mean", ".weight"])] = \
            header.pop(key)
    elif op == 4:
        del header[key]
    elif op == 5:  # the dtype and shape of another tensor, over these bytes
        other = header[keys[int(rng.integers(len(keys)))]]
        entry["dtype"], entry["shape"] = other["dtype"], list(other["shape"])
    elif op == 6:
        entry["shape"] = list(reversed(entry["shape"])) + [1]
    else:
        header["__metadata__"] = {"x": int(rng.integers(10))}
    return _with_header(header, body, rng)


def _value_mutation(state: dict[str, torch.Tensor], rng) -> bytes:
    state = dict(state)
    key = sorted(state)[int(rng.integers(len(state)))]
    shape = state[key].shape
    dtype = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64,
             torch.int32, torch.uint8, torch.bool, torch.uint64][int(rng.integers(9))]
    if dtype.is_floating_point:
        values = torch.tensor(rng.choice(EXTREMES, size=shape), dtype=torch.float64).to(dtype)
    elif dtype == torch.bool:
        values = torch.ones(shape, dtype=dtype)
    else:
        np_dtype = {torch.int64: np.int64, torch.int32: np.int32, torch.uint8: np.uint8,
                    torch.uint64: np.uint64}[dtype]
        info = np.iinfo(np_dtype)
        picks = np.array([info.min, info.max, 0, 1, info.max // 2 + 1], dtype=np_dtype)
        values = torch.from_numpy(rng.choice(picks, size=shape))
    state[key] = values
    return safetensors.torch.save(state)


def _check_served(layer: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = layer.state_dict()
    assert state.keys() == expected.keys()
    for name, value in state.items():
        assert value.shape == expected[name].shape, name
        assert value.dtype == expected[name].dtype, name
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all()), (name, value)
        if name in ("running_var", "num_batches_tracked"):
            assert bool((value >= 0).all()), (name, value)


def _feed(data: bytes, layers, tmp_path: Path | None) -> bool:
    """Load ``data`` (from a file when ``tmp_path`` is given) into each layer; True if any
    layer accepted it."""
    try:
        if tmp_path is None:
            state = load_state_dict_bytes(data, source="fuzz")
        else:
            path = tmp_path / "fuzz.safetensors"
            path.write_bytes(data)
            state = load_state_dict(path)
    except CheckpointError:
        return False
    accepted = False
    for prefix, cls, features in layers:
        kwargs = {"affine": True, "track_running_stats": True} if cls is normcore.InstanceNorm1d \
            else {}
        layer = cls(features, **kwargs)
        fresh = {k: v.clone() for k, v in layer.state_dict().items()}
        try:
            load_layer_state(layer, state, prefix, source="fuzz")
        except CheckpointError:
            for name, value in layer.state_dict().items():
                assert torch.equal(value, fresh[name]), f"refused file changed {name}"
            continue
        _check_served(layer, fresh)
        accepted = True
    return accepted


def _tensor_ranges(data: bytes, prefixes: list[str]) -> list[tuple[int, int]]:
    header, end = _header(data)
    return [(end + v["data_offsets"][0], end + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__" and k.startswith(tuple(prefixes))]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "layers", "cases"), [
    ("digits", DIGITS_LAYERS, 2500), ("small", SMALL_LAYERS, 2500)])
def test_mutated_checkpoints_raise_checkpoint_error_or_load_sane_values(
    name: str, layers, cases: int, tmp_path: Path
) -> None:
    data = DIGITS.read_bytes() if name == "digits" else _small_file()
    assert _feed(data, layers, None)  # the unmutated file loads
    state = safetensors.torch.load(data)
    targets = _tensor_ranges(data, [prefix for prefix, _, _ in layers])
    rng = np.random.default_rng(20240)
    outcomes = {"accepted": 0, "refused": 0}
    for case in range(cases):
        kind = case % 5
        if kind < 3:
            mutated = _byte_mutation(data, targets, rng)
        elif kind == 3:
            mutated = _header_mutation(data, rng)
        else:
            mutated = _value_mutation(state, rng)
        # Every 20th through a file, the other loading path (memory-mapped).
        accepted = _feed(mutated, layers, tmp_path if case % 20 == 0 else None)
        outcomes["accepted" if accepted else "refused"] += 1
    # Both outcomes are exercised, or the mutations are too timid or too wild.
    assert min(outcomes.values()) > cases // 20, outcomes


# --- what the fuzzing found, pinned ------------------------------------------------------

def _bn_state(**overrides: torch.Tensor) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in torch.nn.BatchNorm1d(4).state_dict().items()}
    return state | overrides


@pytest.mark.parametrize("overrides", [
    {"running_mean": torch.tensor([1e300, 0.0, 0.0, 0.0], dtype=torch.float64)},
    {"running_var": torch.tensor([1.0, 1.0, 1.0, 1e39], dtype=torch.float64)},
    {"weight": torch.full((4,), -1e300, dtype=torch.float64)},
], ids=["mean", "var", "weight"])
def test_finite_float64_that_overflows_the_layers_float32_is_refused(overrides) -> None:
    layer = normcore.BatchNorm1d(4)
    with torch.no_grad():  # every tensor unlike _bn_state's, so a half-load would show
        layer.weight.normal_()
        layer.bias.normal_()
        layer(torch.randn(8, 4) * 2 + 1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_layer_state(layer, safetensors.torch.load(safetensors.torch.save(_bn_state(
            **overrides))))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_an_unsigned_count_past_int64_is_refused_not_a_crash() -> None:
    count = torch.from_numpy(np.array(2**63 + 5, dtype=np.uint64))
    with pytest.raises(CheckpointError, match="num_batches_tracked is negative"):
        load_layer_state(normcore.BatchNorm1d(4), _bn_state(num_batches_tracked=count))


def test_other_dtypes_that_fit_are_converted_to_the_layers() -> None:
    layer = normcore.BatchNorm1d(4)
    load_layer_state(layer, _bn_state(running_var=torch.full((4,), 2.5, dtype=torch.float64),
                                      num_batches_tracked=torch.tensor(7, dtype=torch.uint8)))
    assert layer.running_var.dtype == torch.float32
    assert torch.equal(layer.running_var, torch.full((4,), 2.5))
    assert int(layer.num_batches_tracked) == 7
