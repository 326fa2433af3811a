"""A fake GPU for CPU tests and ``bench/bench_host_overhead.py --fake-gpu``: CPU tensors take
the path a CUDA call takes on an sm_90 host.  Compiled-kernel modules with ``loader.Launcher``,
the TMA forward (descriptors), per-call plans with ``Launcher.launch_planned``, Triton's real
``CudaLauncher`` + ``wrap_handle_tensordesc`` (so ``tma_launch``'s raw launches), with a fake
driver (device 0, stream 1234), a fake ``fill_tma_descriptor`` (a tuple of what it encodes) and a
C launcher that records its arguments; a kernel's first launch binds with Triton's real binder
and "compiles" a fake ``CompiledKernel`` per Triton cache key.  Nothing runs: outputs are
garbage."""

from __future__ import annotations

import torch

from attnforge.runtime import cache


def install(patch=setattr, aligned: bool = False) -> list:
    """Make CPU tensors take the GPU path; returns the list the fake C launcher appends its
    arguments to.  ``patch(obj, name, value)`` makes every change (``monkeypatch.setattr`` in
    tests, so they are undone).  ``aligned``: ``torch.empty`` (and ``empty_like``,
    ``empty_strided`` of dense strides, ``zeros``) returns 128-byte aligned tensors, as CUDA's
    caching allocator does (CPU allocations are 64-byte aligned, so out/lse of successive calls
    fall into two classes of low address bits, each its own launch key)."""
    if aligned:
        empty = torch.empty

        def aligned_empty(*size, dtype=None, device=None, **kw):
            shape = torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int) else size)
            t = empty(shape.numel() + 128, dtype=dtype, device=device, **kw)
            skip = (-t.data_ptr() % 128) // t.element_size()
            return t[skip : skip + shape.numel()].view(shape)

        empty_like, empty_strided, zeros = torch.empty_like, torch.empty_strided, torch.zeros

        def aligned_empty_like(t, dtype=None, **kw):
            if kw or not t.is_contiguous():
                return empty_like(t, dtype=dtype, **kw)
            return aligned_empty(t.shape, dtype=dtype or t.dtype, device=t.device)

        def aligned_empty_strided(size, stride, dtype=None, device=None, **kw):
            t = empty_strided(size, stride, dtype=dtype, device=device, **kw)
            if kw or not t.is_contiguous():
                return t
            return aligned_empty(size, dtype=dtype, device=device).as_strided(size, stride)

        def aligned_zeros(*size, **kw):
            return aligned_empty(*size, **kw).zero_() if set(kw) <= {"dtype", "device"} else (
                zeros(*size, **kw))  # fmt: skip

        patch(torch, "empty", aligned_empty)
        patch(torch, "empty_like", aligned_empty_like)
        patch(torch, "empty_strided", aligned_empty_strided)
        patch(torch, "zeros", aligned_zeros)
    import triton
    import triton.backends.nvidia.driver as nv
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import CompiledKernel, make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    from attnforge.runtime import launch, loader

    class Utils:
        def fill_tma_descriptor(self, ptr, swizzle, elem, dtype, block, shape, strides, padding):
            return ("tensormap", ptr, tuple(shape), tuple(strides))

    class Driver:
        utils = Utils()

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 1234

    driver = Driver()
    patch(triton.runtime.driver, "_active", driver)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    launches: list = []
    kind = loader.device_kind
    patch(
        loader,
        "device_kind",
        lambda d: "cuda-sm90" if getattr(d, "type", None) == "cpu" else kind(d),
    )
    default = launch._default_fwd
    patch(launch, "_default_fwd", lambda device, *a: default(torch.device("cuda"), *a))
    patch(launch, "_has_tma", lambda device: True)
    patch(launch, "_sm_count", lambda device: 132)

    def c_launch(*a):
        launches.append(a)

    def compiled(jit, spec, bound):
        """A CompiledKernel whose launcher is Triton's CudaLauncher over ``c_launch``."""
        sig = {i: "constexpr" if p.is_constexpr else spec[i][0] for i, p in enumerate(jit.params)}
        values = list(bound.values())
        metas = [{"swizzle": 3, "elem_size": 2, "elem_type": 10, "fp4_padded": False,
                  "block_size": list(values[i].block_shape)}
                 for i, t in sig.items() if t.startswith("tensordesc")]  # fmt: skip
        run = nv.CudaLauncher.__new__(nv.CudaLauncher)
        run.num_ctas, run.launch_cooperative_grid, run.launch_pdl = 1, False, False
        run.global_scratch_size = run.profile_scratch_size = 0
        run.global_scratch_align = run.profile_scratch_align = 1
        run.launch = nv.wrap_handle_tensordesc(c_launch, sig, metas)
        kernel = object.__new__(CompiledKernel)
        kernel.function, kernel.packed_metadata, kernel._run = 1, 2, run
        return kernel

    def fake(launcher):
        jit = launcher.jit
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        kernels, keys = {}, {}
        jit.device_caches[0] = (kernels, keys, target, backend, binder)
        launcher._device, launcher._stream = driver.get_current_device, driver.get_current_stream
        launcher.store = None  # nothing to keep: no binaries

        def run(*a, grid, warmup, **kw):  # JITFunction.run with a fake compile
            kw["debug"] = kw.get("debug", jit.debug) or knobs.runtime.debug
            kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            bound, spec, options = binder(*a, **kw)
            key = compute_cache_key(keys, spec, options)
            kernel = kernels.get(key) or kernels.setdefault(key, compiled(jit, spec, bound))
            kernel.run(grid[0], 1, 1, 1234, 1, 2, None, None, None, *bound.values())
            return kernel

        jit.run = run

    original = cache._import_kernel

    def import_kernel(*a, **kw):
        module = original(*a, **kw)
        for value in vars(module).values():
            if isinstance(value, loader.Launcher):
                fake(value)
        return module

    patch(cache, "_import_kernel", import_kernel)
    return launches
