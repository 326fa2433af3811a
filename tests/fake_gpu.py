"""A fake GPU for CPU tests and ``bench/bench_host_overhead.py --fake-gpu``: CPU tensors take
the path a CUDA call takes on an sm_90 host.  Compiled-kernel modules with ``loader.Launcher``,
the TMA forward (descriptors), per-call plans with ``Launcher.launch_planned``, Triton's real
``CudaLauncher`` + ``wrap_handle_tensordesc`` (so ``tma_launch``'s raw launches), with a fake
driver (device 0, stream 1234), a fake ``fill_tma_descriptor`` (a tuple of what it encodes) and a
C launcher that records its arguments; a kernel's first launch binds with Triton's real binder
and "compiles" a fake ``CompiledKernel`` per Triton cache key.  Nothing runs: outputs are
garbage."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from attnforge.runtime import cache


def install(patch=setattr, aligned: bool = False, store: bool = False, ws: bool = False) -> list:
    """Make CPU tensors take the GPU path; returns the list the fake C launcher appends its
    arguments to.  ``patch(obj, name, value)`` makes every change (``monkeypatch.setattr`` in
    tests, so they are undone).  ``aligned``: ``torch.empty`` (and ``empty_like``,
    ``empty_strided`` of dense strides, ``zeros``) returns 128-byte aligned tensors, as CUDA's
    caching allocator does (CPU allocations are 64-byte aligned, so out/lse of successive calls
    fall into two classes of low address bits, each its own launch key).  ``store``: kernels
    keep their (fake) binaries in the cache entry and the launch index as on a GPU, so a new
    process launches them without Triton's binder (``triton.compiler.CompiledKernel`` becomes a
    fake whose binary is the descriptor metadata).  ``ws``: an sm_90 whose Triton has Gluon, so
    bf16/fp16 forwards that qualify take the warp-specialised kernel (``fwd_ws.py``: Gluon
    descriptors)."""
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
    from triton.compiler import ASTSource, CompiledKernel, make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    from attnforge.runtime import launch, loader

    class Utils:
        def fill_tma_descriptor(self, ptr, swizzle, elem, dtype, block, shape, strides, padding):
            return ("tensormap", ptr, tuple(shape), tuple(strides))

        fill_tma_descriptor_tiled = fill_tma_descriptor  # (triton >= 3.7)

    class Driver:
        utils = Utils()

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 1234

        def get_current_target(self):
            return target

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    driver = Driver()
    patch(triton.runtime.driver, "_active", driver)
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
    patch(launch, "_capability", lambda device: (9, 0))
    ws_device = launch._ws_device.__wrapped__  # (uncached: the device kind is patched)
    patch(launch, "_ws_device", lambda device: ws and ws_device(device))

    def c_launch(*a):
        launches.append(a)

    def launcher_of(sig: dict, metas: list):
        """Triton's CudaLauncher over ``c_launch`` (``sig``: position -> Triton type)."""
        run = nv.CudaLauncher.__new__(nv.CudaLauncher)
        run.num_ctas, run.launch_cooperative_grid, run.launch_pdl = 1, False, False
        run.global_scratch_size = run.profile_scratch_size = 0
        run.global_scratch_align = run.profile_scratch_align = 1
        run.gsan_enabled, run.arg_annotations, run.kernel_signature = False, None, None  # (>= 3.7)
        run.launch = nv.wrap_handle_tensordesc(c_launch, sig, metas)
        return run

    def compiled(jit, spec, bound):
        """A CompiledKernel whose launcher is Triton's CudaLauncher over ``c_launch``."""
        sig = {i: "constexpr" if p.is_constexpr else spec[i][0] for i, p in enumerate(jit.params)}
        values = list(bound.values())
        metas = [{"swizzle": 3, "elem_size": 2, "elem_type": 10, "fp4_padded": False,
                  "block_size": list(values[i].block_shape)}
                 for i, t in sig.items() if t.startswith("tensordesc")]  # fmt: skip
        kernel = object.__new__(Kept if store else CompiledKernel)
        kernel.function, kernel.packed_metadata, kernel._run = 1, 2, launcher_of(sig, metas)
        return kernel, metas

    class Kept:
        """Triton's CompiledKernel of a kept binary: its ``.json`` holds the descriptor metadata."""

        def __init__(self, src, metadata_group, hash):
            path = next(p for n, p in metadata_group.items() if n.endswith(".json"))
            meta = json.loads(Path(path).read_text())
            self.src, self.metadata_group, self.hash, self.name = src, metadata_group, hash, meta[
                "name"]  # fmt: skip
            sig = dict(enumerate(src.signature.values()))
            self.function, self.packed_metadata = 1, 2
            self._run = launcher_of(sig, meta["metas"])

        def _init_handles(self):
            pass

        @property
        def run(self):
            return self._run

    if store:
        import tempfile

        # launch keys see addresses as CUDA's allocator makes them (every allocation 512-byte
        # aligned; CPU's are 64-byte aligned and tensors made inside torch are not patched
        # above), so a later process's keys can match an earlier one's
        patch(loader, "_data_ptr", lambda t: t.data_ptr() & ~127)

        files_dir = Path(tempfile.mkdtemp(prefix="attnforge-fake-bin-"))
        patch(triton.compiler, "CompiledKernel", Kept)

    def fake(launcher):
        jit = launcher.jit
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        kernels, keys = {}, {}
        if store:  # what the launch index put there (a stand-in's kernels)
            kernels.update(jit.device_caches.get(0, ({},))[0])
        jit.device_caches[0] = (kernels, keys, target, backend, binder)
        launcher._device, launcher._stream = driver.get_current_device, driver.get_current_stream
        if not store:
            launcher.store = None  # nothing to keep: no binaries

        def run(*a, grid, warmup, **kw):  # JITFunction.run with a fake compile
            kw["debug"] = kw.get("debug", jit.debug) or knobs.runtime.debug
            kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            bound, spec, options = binder(*a, **kw)
            key = compute_cache_key(keys, spec, options)
            kernel = kernels.get(key)
            if kernel is None:
                kernel, metas = compiled(jit, spec, bound)
                if store:  # as Triton's compile: files, the source it was built from
                    opts, sig, consts, attrs = jit._pack_args(backend, kw, bound, spec, options)
                    name = f"{jit.__name__}-{abs(hash(key))}"
                    files = {}
                    for ext, data in (("json", json.dumps({"name": jit.__name__, "metas": metas})),
                                      ("cubin", "\x7fELF")):  # fmt: skip
                        (files_dir / f"{name}.{ext}").write_text(data)
                        files[f"{jit.__name__}.{ext}"] = str(files_dir / f"{name}.{ext}")
                    kernel.src = ASTSource(jit, sig, consts, attrs)
                    kernel.metadata_group, kernel.hash, kernel.name = files, key, jit.__name__
                    launcher._options[key] = opts
                kernels[key] = kernel
            if not warmup:
                kernel.run(grid[0], 1, 1, 1234, 1, 2, None, None, None, *bound.values())
            return kernel

        jit.run = run
        if store:
            jit.warmup = lambda *a, grid, **kw: run(*a, grid=grid, warmup=True, **kw)

    original = cache._import_kernel

    def import_kernel(*a, **kw):
        module = original(*a, **kw)
        for value in vars(module).values():
            if isinstance(value, loader.Launcher):
                if type(value.jit) is loader.JitStandIn:  # (its fake comes with the real one)
                    value._device, value._stream = driver.get_current_device, (
                        driver.get_current_stream)  # fmt: skip
                else:
                    fake(value)
        return module

    attach = loader.Launcher._attach

    def attach_fake(launcher, real):
        stand_in = launcher.jit
        attach(launcher, real)
        if launcher.jit is not stand_in:
            fake(launcher)

    patch(cache, "_import_kernel", import_kernel)
    patch(loader.Launcher, "_attach", attach_fake)
    return launches
