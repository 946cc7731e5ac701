"""The fused kernels: where they apply, where they decline, how they fail, and the shapes
that exercise their edges (one value pair per channel, huge channel counts, planes and rows
split across chunks, channels_last), each against torch.nn."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading

import pytest
import torch

import normcore
from normcore import kernels
from normcore.kernels import _loader

from .cases import (
    CHANNELS_LAST,
    EDGES,
    FLOAT32,
    LARGE,
    PER_KIND,
    PRECISIONS,
    Case,
    Row,
    rows,
)
from .checks import Spy, assert_same, torch_threads

# torch.nn.RMSNorm itself warns that mixed dtypes (half input, float32 weight) skip its
# fused kernel.
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


# --- building and switching ----------------------------------------------------------------


def test_kernels_build_where_there_is_a_compiler() -> None:
    if not any(map(shutil.which, _loader.COMPILERS)):
        pytest.skip("no C++ compiler on this machine")
    assert kernels.warm_up(), _loader._state.failure


def test_a_failed_build_logs_one_warning_and_leaves_the_torch_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(_loader, "COMPILERS", ("normcore-no-such-compiler",))
    monkeypatch.setattr(_loader, "_state", _loader._State())
    case = Case("BatchNorm1d", {"num_features": 4}, ((16, 4, 3),))
    ours, ref = case.pair()
    x = torch.randn(case.shapes[0])
    with caplog.at_level(logging.WARNING, logger="normcore.kernels"):
        assert not kernels.warm_up()
        assert_same(ours, ref, x)
        assert not kernels.warm_up()
    warnings = [r for r in caplog.records if r.name == "normcore.kernels"]
    assert len(warnings) == 1
    assert "no C++ compiler" in warnings[0].getMessage()
    assert not list(tmp_path.rglob("*.so"))


def test_a_unit_that_does_not_compile_fails_the_build_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    if not any(map(shutil.which, _loader.COMPILERS)):
        pytest.skip("no C++ compiler on this machine")
    sources = tmp_path / "csrc"
    sources.mkdir()
    (sources / "norm_kernels.cpp").write_text("int module_part() { return 0; }\n")
    (sources / "types_broken.cpp").write_text("#error this unit does not compile\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "built"))
    monkeypatch.setattr(_loader, "SOURCES", sources)
    monkeypatch.setattr(_loader, "_state", _loader._State())
    with caplog.at_level(logging.WARNING, logger="normcore.kernels"):
        assert not kernels.warm_up()
    assert "types_broken.cpp" in _loader._state.failure
    assert "this unit does not compile" in _loader._state.failure
    assert len([r for r in caplog.records if r.name == "normcore.kernels"]) == 1
    built = tmp_path / "built"
    assert not [p for p in built.rglob("*") if p.is_file()]  # no library, no objects
    assert [p.name for p in built.iterdir()] == [_loader.build_directory().name]


def test_without_a_compiler_on_path_a_fresh_process_falls_back(tmp_path) -> None:
    # The whole first-use path in a clean interpreter: nothing raises, one warning, results.
    code = (
        "import torch, normcore\n"
        "x = torch.randn(8, 3)\n"
        "out = normcore.BatchNorm1d(3)(x)\n"
        "torch.testing.assert_close(out, torch.nn.BatchNorm1d(3)(x))\n"
        "print(normcore.kernels.warm_up())\n"
    )
    env = {"PATH": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(tmp_path),
           "PYTHONPATH": str(_loader.SOURCES.parents[2]), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert done.stderr.count("normcore kernels unavailable") == 1


def test_switching_off_takes_the_torch_path(spy: Spy) -> None:
    case = Case("LayerNorm", {"normalized_shape": [8]}, ((4, 8),))
    ours, ref = case.pair()
    x = torch.randn(case.shapes[0])
    assert kernels.set_enabled(False) is True
    assert not kernels.enabled()
    assert_same(ours, ref, x)
    assert not spy.calls
    kernels.set_enabled(True)
    assert_same(ours, ref, x)
    assert spy.calls["layer_norm"] == 3


def test_the_build_is_cached_per_source(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not kernels.warm_up():
        pytest.skip("the kernels are not available here")
    built = _loader.build()
    assert built.exists()
    # A second call finds it: the same file, not a rebuild renamed into its place.
    before = built.stat()
    assert _loader.build() == built
    after = built.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert _loader.build_directory().parent == tmp_path
    # Linked against torch's libraries: another torch is another build.
    key = _loader.build_directory()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert _loader.build_directory() != key


# --- what the kernels take and what they leave to torch ------------------------------------

@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("row", rows(EDGES, precisions=PRECISIONS))
def test_edge_shapes_match_torch_through_the_kernels(spy: Spy, row: Row) -> None:
    ours, ref = row.pair()
    assert_same(ours, ref, row.input(row.case.shapes[0], scale=2, shift=1), row.precision)
    assert sum(spy.calls.values()) == 3


@pytest.mark.parametrize("row", rows(CHANNELS_LAST, precisions=PRECISIONS))
def test_channels_last_input_is_normalized_in_place_of_layout(spy: Spy, row: Row) -> None:
    ours, ref = row.pair()
    x = row.input(row.case.shapes[0])
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    x = x.contiguous(memory_format=fmt)
    assert_same(ours, ref, x, row.precision)
    with torch.no_grad():
        assert ours.train()(x).is_contiguous(memory_format=fmt)
    assert spy.calls["batch_norm_train"] == 3  # two train steps in _assert_same, one here
    assert spy.calls["batch_norm_eval"] == 1


def _strided(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values and shape in memory ordered otherwise: neither contiguous nor
    channels_last."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


# Strided inputs of every dtype; and float16/bfloat16 inputs into layers of their own dtype
# (torch.nn takes them; the kernels compute under float32 or float64 parameters only).
DECLINED = [
    pytest.param(Row(case, precision), layout, id=f"{case.id}-{precision.id}-{layout}")
    for case in PER_KIND
    for precision in PRECISIONS
    for layout in ("strided", "half layer")
    if precision.reduced or layout == "strided"
]


@pytest.mark.parametrize(("row", "layout"), DECLINED)
def test_inputs_the_kernels_do_not_take_go_to_torch(spy: Spy, row: Row, layout: str) -> None:
    ours, ref = row.pair()
    x = row.input(row.case.shapes[0], scale=2, shift=1)
    if layout == "strided":
        x = _strided(x)
        assert not x.is_contiguous()
    else:
        ours, ref = ours.to(x.dtype), ref.to(x.dtype)
    assert_same(ours, ref, x, row.precision)
    assert not spy.calls


def test_channels_last_group_norm_goes_to_torch(spy: Spy) -> None:
    case = Case("GroupNorm", {"num_groups": 2, "num_channels": 8}, ((4, 8, 5, 6),))
    ours, ref = case.pair()
    x = torch.randn(case.shapes[0]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        FLOAT32.assert_close(ours(x), ref(x))
    assert not spy.calls


def test_autograd_takes_the_torch_path_and_gets_torch_gradients(spy: Spy) -> None:
    case = Case("LayerNorm", {"normalized_shape": [16]}, ((8, 16),))
    ours, ref = case.pair()
    x = torch.randn(case.shapes[0], requires_grad=True)
    y = torch.randn(8, 16)
    (ours(x) * y).sum().backward()
    grad, x.grad = x.grad, None
    (ref(x) * y).sum().backward()
    torch.testing.assert_close(grad, x.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    assert not spy.calls


@pytest.mark.parametrize(("layer", "kernel"), [
    (lambda: normcore.BatchNorm2d(4), "batch_norm_train"),
    (lambda: normcore.InstanceNorm2d(4, track_running_stats=True), "instance_norm_train"),
], ids=["BatchNorm2d", "InstanceNorm2d"])
def test_running_statistics_written_by_the_kernels_bump_their_version(spy: Spy, layer,
                                                                      kernel: str) -> None:
    layer = layer()
    before = layer.running_mean._version, layer.running_var._version
    with torch.no_grad():
        layer(torch.randn(8, 4, 3, 3))
    assert spy.calls[kernel] == 1
    assert layer.running_mean._version > before[0]
    assert layer.running_var._version > before[1]
    if isinstance(layer, normcore.BatchNorm2d):
        assert int(layer.num_batches_tracked) == 1


STAT_TOLERANCES = {  # input dtype -> (statistics dtype, rtol of the mean, rtol of the var)
    torch.float32: (torch.float32, 1e-6, 1e-4),
    torch.float16: (torch.float32, 1e-6, 1e-4),
    torch.bfloat16: (torch.float32, 1e-6, 1e-4),
    torch.float64: (torch.float64, 1e-14, 1e-12),
}


@pytest.mark.parametrize("dtype", STAT_TOLERANCES)
@pytest.mark.parametrize(("shape", "channels_last"), [
    ((2, 3), False), ((16, 64), False), ((4, 8, 70), False), ((3, 5, 4, 4), False),
    ((3, 5, 4, 4), True), ((2, 4, 3, 8, 8), True), ((45, 10), False), ((3, 3, 5, 7), True),
])
def test_batch_statistics_alone_match_a_float64_reduction(spy: Spy, shape, channels_last,
                                                          dtype) -> None:
    # Far from zero: a shifted sum keeps the variance.
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 50).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    mean, var = normcore.functional.batch_norm_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=[0, *range(2, x.dim())], correction=0)
    stat_dtype, mean_rtol, var_rtol = STAT_TOLERANCES[dtype]
    assert mean.dtype == var.dtype == stat_dtype
    torch.testing.assert_close(mean, ref_mean.to(stat_dtype), rtol=mean_rtol, atol=1e-5)
    torch.testing.assert_close(var, ref_var.to(stat_dtype), rtol=var_rtol, atol=1e-5)
    assert spy.calls["batch_norm_train"] == 1  # statistics only: no output written


@pytest.mark.parametrize(("shape", "channels_last"), [
    ((16, 64), False), ((4, 8, 70), False), ((5, 16, 56, 56), False), ((3, 5, 4, 4), True),
    ((2, 3, 100_000), False), ((45, 10), False), ((3, 3, 5, 7), True),
])
@pytest.mark.parametrize("dtype", STAT_TOLERANCES)
@pytest.mark.usefixtures("output_stores")
def test_eval_statistics_come_in_the_read_that_normalizes(spy: Spy, shape, channels_last,
                                                         dtype) -> None:
    layer = normcore.BatchNorm1d(shape[1]) if len(shape) < 4 else normcore.BatchNorm2d(shape[1])
    layer.to(STAT_TOLERANCES[dtype][0])
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    x = (torch.randn(shape) * 3 + 50).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        output, mean, var = layer.eval().normalize(x)
        assert spy.calls["batch_norm_eval_stats"] == 1  # one kernel call
        assert spy.calls["batch_norm_train"] == spy.calls["batch_norm_eval"] == 0
        # The same sums as the statistics pass, the same output as forward.
        assert torch.equal(output, layer(x))
        stats = normcore.functional.batch_norm_stats(x)
    assert torch.equal(mean, stats[0])
    assert torch.equal(var, stats[1])


@pytest.mark.parametrize(("shape", "threads"), [
    ((24, 32, 2048), 1), ((24, 32, 2048), 2),  # channels normalized as their sums come,
    ((16, 256, 512), 2), ((1, 8, 140_000), 1),  # of short planes, of planes in pieces
    ((24, 32, 2048), 9),  # too few channels per thread: two whole passes
    ((1, 8, 600_000), 1),  # channels of 1.2-4.8 MB, over half of most L2s: two passes
    ((4, 16, 10, 10), 1),  # all of it in cache anyway: two passes
])
@pytest.mark.parametrize("dtype", STAT_TOLERANCES)
@pytest.mark.usefixtures("output_stores")
def test_a_train_step_has_the_statistics_pass_sums(spy: Spy, shape, threads, dtype) -> None:
    layer = normcore.BatchNorm1d(shape[1]) if len(shape) < 4 else normcore.BatchNorm2d(shape[1])
    layer.to(STAT_TOLERANCES[dtype][0])
    x = (torch.randn(shape) * 3 + 50).to(dtype)
    with torch.no_grad(), torch_threads(threads):
        output, mean, var = layer.train().normalize(x)
        stats = normcore.functional.batch_norm_stats(x)
        expected = torch.nn.functional.batch_norm(
            x.double(), None, None, training=True, eps=layer.eps).to(dtype)
    assert spy.calls["batch_norm_train"] == 2
    assert torch.equal(mean, stats[0])
    assert torch.equal(var, stats[1])
    # One rounding from the exact value, give or take one unit of the input's dtype.
    torch.testing.assert_close(output, expected, rtol=2 * torch.finfo(dtype).eps, atol=1e-5)


@pytest.mark.parametrize("row", rows(LARGE))
def test_results_do_not_depend_on_the_thread_count(spy: Spy, row: Row) -> None:
    # Partial sums are kept per chunk and added in a fixed order.
    x = row.input(row.case.shapes[0], shift=3)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            layer = getattr(normcore, row.case.kind)(**row.case.kwargs)
            with torch.no_grad():
                results.append((layer.normalize(x), layer.state_dict()))
    finally:
        torch.set_num_threads(threads)
    assert sum(spy.calls.values()) == 3  # one normalize per thread count, all fused
    (first, first_state), *rest = results
    for result, state in rest:
        for a, b in zip(first, result, strict=True):
            assert torch.equal(a, b)
        for key, value in first_state.items():
            assert torch.equal(state[key], value), key


@pytest.mark.usefixtures("two_threads")
def test_concurrent_callers_get_their_own_results(spy: Spy) -> None:
    # The kernels release the GIL; several Python threads may run them at once.
    layer = normcore.BatchNorm2d(8).eval()
    inputs = [torch.randn(16, 8, 64, 64) * (i + 1) for i in range(4)]
    with torch.no_grad():
        expected = [torch.nn.functional.batch_norm(x, layer.running_mean, layer.running_var)
                    for x in inputs]
    outputs: list[torch.Tensor | None] = [None] * len(inputs)

    def run(i: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                outputs[i] = layer(inputs[i])

    workers = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for got, want in zip(outputs, expected, strict=True):
        FLOAT32.assert_close(got, want)
    assert spy.calls["batch_norm_eval"] == 5 * len(inputs)


def test_tune_allocator_is_idempotent() -> None:
    first = kernels.tune_allocator()
    assert kernels.tune_allocator() == first
    with pytest.raises(ValueError, match="keep_bytes"):
        kernels.tune_allocator(-1)

