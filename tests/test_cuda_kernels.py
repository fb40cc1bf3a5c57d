"""The CUDA kernels: compiled with nvcc for every target here (no GPU needed), run against the CPU kernels
in the `gpu` tier."""

from __future__ import annotations

import io

import pytest
import torch

from vdopt.cuda.check_kernels import ARCHITECTURES, check_kernels, find_nvcc, parse_usage

needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc is not installed on this machine")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine (CPU torch or no device)")


@needs_nvcc
def test_every_kernel_compiles_for_every_target_without_spills():
    report = io.StringIO()
    usage = check_kernels(out=report)
    kernels = {(k.arch, k.kernel.split("<")[0]) for k in usage}
    assert kernels == {(arch, name) for arch in ARCHITECTURES for name in ("cache_decision_kernel", "taylor_forecast_kernel", "layer_norm_modulate_kernel")}
    assert all(k.registers > 0 and not k.spill_stores and not k.spill_loads for k in usage)
    assert "cache_decision_kernel<float>" in report.getvalue()


@needs_nvcc
def test_a_kernel_that_does_not_compile_fails_the_check(tmp_path):
    (tmp_path / "broken.cu").write_text("__global__ void k(float* x) { x[0] = undefined_name; }\n")
    with pytest.raises(RuntimeError, match=r"broken.cu \(sm_80\) does not compile"):
        check_kernels(("sm_80",), root=tmp_path, out=io.StringIO())


def test_a_spilling_kernel_is_reported_as_a_failure():
    log = ("ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z1kPf\n"
           "    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 0 barriers, 360 bytes cmem[0]\n")
    (kernel,) = parse_usage(log, "k.cu")
    assert (kernel.arch, kernel.registers, kernel.spill_stores, kernel.spill_loads) == ("sm_90", 255, 40, 36)


# ----- the `gpu` tier: the CUDA kernels against the CPU kernels ---------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, shape", [(4, (8, 3000, 5)), (1, (1, 7)), (0, (0, 4)), (2, (6, 257))])
def test_cuda_kernels_equal_the_cpu_kernels(dtype, rows, shape):
    from vdopt.ops import library_path

    library_path()
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(shape, generator=generator).to(dtype)
    prev = (probe.float() + 0.3 * torch.randn(shape, generator=generator)).to(dtype)
    accumulated, forced = torch.rand(rows, generator=generator), torch.rand(rows, generator=generator) > 0.7
    coefficients = torch.tensor([0.7, -0.2, 1.0, 0.05])
    for threshold in (0.0, 0.3, 1e9):
        cpu = torch.ops.vdopt.cache_decision(probe, prev, accumulated, forced, coefficients, threshold)
        gpu = torch.ops.vdopt.cache_decision(probe.cuda(), prev.cuda(), accumulated.cuda(), forced.cuda(), coefficients.cuda(), threshold)
        for c, g in zip(cpu, gpu):
            torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-6)
    weight = torch.rand(rows, generator=generator)
    torch.testing.assert_close(torch.ops.vdopt.taylor_forecast(probe.cuda(), prev.cuda(), weight.cuda()).cpu(),
                               torch.ops.vdopt.taylor_forecast(probe, prev, weight), rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, modulation", [((16, 64, 64), (16, 1, 64)), ((4, 9, 3072), (1, 1, 3072)), ((2, 5, 7), (2, 5, 7))])
def test_cuda_layer_norm_modulate_equals_the_cpu_kernel(dtype, shape, modulation):
    from vdopt.ops import library_path

    library_path()
    generator = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(shape, generator=generator) + 1).to(dtype)
    scale, shift = (torch.randn(modulation, generator=generator).to(dtype) for _ in range(2))
    cpu = torch.ops.vdopt.layer_norm_modulate(x, scale, shift, 1e-6)
    gpu = torch.ops.vdopt.layer_norm_modulate(x.cuda(), scale.cuda(), shift.cuda(), 1e-6).cpu()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gpu, cpu, rtol=tolerance, atol=tolerance)


def test_the_kernel_library_links_and_a_launch_without_a_gpu_reports_an_error():
    """The launchers the TensorRT plugins and a C++ app call: built by nvcc, loadable, and a launch on a machine
    without a usable GPU returns a CUDA error code instead of crashing (an empty launch is a no-op, 0)."""
    import ctypes

    from vdopt.ops import kernel_library

    if find_nvcc() is None:
        pytest.skip("nvcc is not installed on this machine")
    kernels = ctypes.CDLL(str(kernel_library()))
    kernels.vdopt_taylor_forecast.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 3, ctypes.c_int64, ctypes.c_int64,
                                              ctypes.c_void_p, ctypes.c_void_p]
    assert kernels.vdopt_taylor_forecast(0, None, None, None, 0, 4, None, None) == 0
    if not torch.cuda.is_available():  # on a GPU this launch would fault on its null pointers
        assert kernels.vdopt_taylor_forecast(0, None, None, None, 2, 4, None, None) != 0
