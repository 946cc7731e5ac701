"""KServe V2 (Open Inference Protocol) vocabulary: datatypes, outputs, metadata.

Every served layer is a model with one input tensor and the outputs ``output`` (the
normalized input, in the input's datatype), the batch statistics ``batch_mean`` and
``batch_var`` (``batch_mean_square`` for RMSNorm), always FP32, and in eval mode ``drift``:
the batch's drift score (``service.core.drift``), FP32 of shape [1], NaN when there is none.

Model metadata gives each tensor one shape, so an input lists the lowest-rank batched
form the layer takes, with -1 for free dims; the higher-rank forms torch.nn accepts are
served too (BatchNorm1d ``[N, C, L]``, GroupNorm ``[N, C, *]``, LayerNorm/RMSNorm with
more leading dims).
"""

from __future__ import annotations

from typing import Any

from ..core.errors import VersionNotFoundError, shown

PLATFORM = "normcore"
# A model has one version at a time: 1 for a layer of the catalog, one more each time a
# layer is put under its name (since the server started).
# NOTE: tritonclient never reads this list; Triton names the extensions this way.
EXTENSIONS = ("binary_tensor_data", "parameters", "model_repository", "statistics",
              "model_configuration")

# V2 datatype -> wire.tensors dtype name (the little-endian wire layout is the same).
DATATYPES: dict[str, str] = {
    "FP32": "float32",
    "FP16": "float16",
    "BF16": "bfloat16",
    "FP64": "float64",
}
DATATYPE_OF = {dtype: datatype for datatype, dtype in DATATYPES.items()}
STATS_DATATYPE = "FP32"

OUTPUT = "output"
DRIFT = "drift"


def stat_output(stat: str) -> str:
    """The output name of a batch statistic (``mean`` -> ``batch_mean``)."""
    return f"batch_{stat}"


def stat_names(kind: str) -> tuple[str, ...]:
    return ("mean_square",) if kind == "RMSNorm" else ("mean", "var")


def output_names(kind: str) -> tuple[str, ...]:
    return (OUTPUT, *(stat_output(s) for s in stat_names(kind)), DRIFT)


def _rank(kind: str) -> int:
    """Spatial dims in a kind's name: BatchNorm2d -> 2."""
    return int(kind[-2])


def tensor_shapes(kind: str, config: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(input shape, statistics shape) of a layer, -1 for free dims."""
    if kind.startswith("BatchNorm"):
        spatial = 0 if kind == "BatchNorm1d" else _rank(kind)  # BatchNorm1d: [N, C] first
        return [-1, config["num_features"], *[-1] * spatial], [config["num_features"]]
    if kind.startswith("InstanceNorm"):
        channels = config["num_features"]
        return [-1, channels, *[-1] * _rank(kind)], [-1, channels]
    if kind == "GroupNorm":
        return [-1, config["num_channels"]], [-1, config["num_groups"]]
    # LayerNorm, RMSNorm: statistics per leading position.
    return [-1, *config["normalized_shape"]], [-1]


def model_metadata(name: str, kind: str, config: dict[str, Any], version: int = 1
                   ) -> dict[str, Any]:
    """``GET /v2/models/{name}`` for a layer of ``kind`` built with ``config``."""
    shape, stats_shape = tensor_shapes(kind, config)
    outputs = [{"name": OUTPUT, "datatype": "FP32", "shape": shape}]
    outputs += [{"name": stat_output(s), "datatype": STATS_DATATYPE, "shape": stats_shape}
                for s in stat_names(kind)]
    outputs.append({"name": DRIFT, "datatype": STATS_DATATYPE, "shape": [1]})
    return {
        "name": name,
        "versions": [str(version)],
        "platform": PLATFORM,
        # NOTE: one datatype per tensor in metadata; FP16, BF16 and FP64 inputs are
        # accepted as well, and the output then has the input's datatype.
        "inputs": [{"name": "input", "datatype": "FP32", "shape": shape}],
        "outputs": outputs,
    }


def server_metadata(version: str) -> dict[str, Any]:
    """``GET /v2``."""
    return {"name": PLATFORM, "version": version, "extensions": list(EXTENSIONS)}


def check_version(name: str, version: str, current: int = 1) -> None:
    """Refuse a version of a model other than the one there is (``current``)."""
    if version != str(current):
        raise VersionNotFoundError(f"model '{shown(name)}' has no version '{shown(version)}'; "
                                   f"its only version is '{current}'")


