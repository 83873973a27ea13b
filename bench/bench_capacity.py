"""Growth: expanding ~200 adapters at once, and what a growth costs the compiled training step.

Timing cases (one growth r -> r+1 of every module per timed call; modules reset, untimed, near capacity):
    ours              expand_modules(modules) (backend "auto": the C++/CUDA extension when loaded)
    batched_fallback  expand_modules(modules, backend="fallback") (pure PyTorch, batched)
    per_module_api    expand_modules([module]) for each module (one library call per module)
    naive_loop        the plain per-module Python loop: copy the trial row into A, zero B's column, draw the
                      next trial row, bump the rank
Past capacity (every module at rank == capacity, SeLoRAAdamW state present): ours vs batched_fallback.

Compilation cases (counts, not timings; zero is required and asserted):
    new torch.compile graphs across growths r -> r+1 within capacity (CPU: aot_eager backend, GPU: inductor)
    new Triton compilations across the same growths (GPU; eager and compiled steps, measuring on and off)
    a CUDA-graph step (torch.compile mode="reduce-overhead") replayed across a growth: output must follow
    the grown adapter (checked against eager), recompiles and re-recordings recorded.

The module set mimics SD 1.5: 16 UNet transformer blocks x (attn1 q/k/v/out, attn2 q/out d->d, attn2 k/v
768->d, ff.net.0.proj d->8d) + 12 text-encoder layers x (q/k/v/out 768->768) = 192 modules; modules of
one shape share their frozen base weight (the adapters are independent).
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

UNET_LEVELS = [(320, 5), (640, 5), (1280, 6)]  # (width, transformer blocks); 16 blocks in SD 1.5
CAPACITY = 15
ADAM_RANK = 8  # live slots in the optimizer-step case
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"), pytest.param("cpu", id="cpu")]


def module_shapes():
    shapes = []
    for width, blocks in UNET_LEVELS:
        for _ in range(blocks):
            shapes += [(width, width)] * 6 + [(768, width)] * 2 + [(width, 8 * width)]
    shapes += [(768, 768)] * (12 * 4)
    return shapes


def build_modules(device, rank=1, capacity=CAPACITY, bases=None):
    from selora_kernels import SeLoRALinear

    bases = {} if bases is None else bases
    modules = []
    for d_in, d_out in module_shapes():
        if (d_in, d_out) not in bases:
            bases[(d_in, d_out)] = torch.nn.Linear(d_in, d_out, device=device).requires_grad_(False)
        modules.append(SeLoRALinear.from_linear(bases[(d_in, d_out)], r_init=rank, capacity=capacity))
    return modules, bases


def reset_rank(modules, rank=1):
    """Back to `rank` live slots (dead slots zeroed): untimed setup between growths."""
    with torch.no_grad():
        for module in modules:
            module.lora_A[rank:].zero_()
            module.lora_B[:, rank:].zero_()
            module.set_live_rank(rank)


def naive_expand(modules, generator):
    with torch.no_grad():
        for module in modules:
            r = module.rank
            module.lora_A[r].copy_(module.trial_row)
            module.lora_B[:, r].zero_()
            bound = math.sqrt(6.0 / module.in_features)
            module.trial_row.copy_(torch.rand(module.in_features, generator=generator) * (2 * bound) - bound)
            module.set_live_rank(r + 1)


def _extension_route():
    try:
        from selora_kernels._extension import extension_status

        return extension_status()
    except Exception as error:  # noqa: BLE001
        return f"unavailable: {type(error).__name__}: {error}"


@pytest.mark.parametrize("device", DEVICES)
def test_growth_within_capacity(harness, request, device, benchmark):
    harness.device_or_skip(device)
    from selora_kernels import expand_modules

    route = _extension_route()
    sets, bases = {}, {}
    names = ["ours", "per_module_api", "naive_loop"] + (["batched_fallback"] if route in ("aot", "jit") else [])
    for name in names:
        sets[name], bases = build_modules(device, bases=bases)
    generator = torch.Generator().manual_seed(0)
    seeds = iter(range(10**6))

    def setup(name):
        if sets[name][0].rank >= CAPACITY - 1:
            reset_rank(sets[name])

    def timed(fn):
        def run():
            fn()
            harness.sync(device)
        return run

    providers = {
        "ours": timed(lambda: expand_modules(sets["ours"], seed=next(seeds))),
        "per_module_api": timed(lambda: [expand_modules([m], seed=next(seeds)) for m in sets["per_module_api"]]),
        "naive_loop": timed(lambda: naive_expand(sets["naive_loop"], generator)),
    }
    if "batched_fallback" in sets:
        providers["batched_fallback"] = timed(
            lambda: expand_modules(sets["batched_fallback"], seed=next(seeds), backend="fallback"))
    errors = {}
    if "batched_fallback" not in sets:
        errors["batched_fallback"] = f"skipped: extension route is {route!r}, so ours is the fallback"
    times = harness.measure(providers, device, rounds=10, iterations=1, setup=setup, errors=errors)
    params = {"device": device, "modules": len(sets["ours"]), "capacity": CAPACITY, "mode": "expand_within",
              "growth": "r -> r+1, every module"}
    harness.record(request, op="growth", params=params, ours="ours", times=times,
                   path=f"expand_modules backend=auto (extension route: {route})", errors=errors,
                   benchmark=benchmark)


@pytest.mark.parametrize("device", DEVICES)
def test_growth_past_capacity(harness, request, device, benchmark):
    harness.device_or_skip(device)
    from selora_kernels import SeLoRAAdamW, expand_modules

    route = _extension_route()
    names = ["ours"] + (["batched_fallback"] if route in ("aot", "jit") else [])
    state = {}
    for name in names:
        modules, _ = build_modules(device, rank=CAPACITY, capacity=CAPACITY)
        optimizer = SeLoRAAdamW([p for m in modules for p in (m.lora_A, m.lora_B)], lr=1e-6)
        state[name] = (modules, optimizer)

    def setup(name):
        modules, optimizer = state[name]
        with torch.no_grad():
            for module in modules:
                module._reallocate_capacity(CAPACITY)
                module.lora_A.normal_()
                module.lora_B.normal_()
                module.set_live_rank(CAPACITY)
                module.lora_A.grad = torch.zeros_like(module.lora_A)
                module.lora_B.grad = torch.zeros_like(module.lora_B)
        optimizer.state.clear()
        optimizer.step()  # optimizer state at the old capacity, grown with the parameters
        harness.sync(device)

    seeds = iter(range(10**6))

    def make(backend):
        def run():
            modules, optimizer = state["ours" if backend == "auto" else "batched_fallback"]
            expand_modules(modules, optimizer=optimizer, seed=next(seeds), backend=backend)
            harness.sync(device)
        return run

    providers = {"ours": make("auto")}
    errors = {}
    if "batched_fallback" in state:
        providers["batched_fallback"] = make("fallback")
    else:
        errors["batched_fallback"] = f"skipped: extension route is {route!r}, so ours is the fallback"
    times = harness.measure(providers, device, rounds=3 if device == "cpu" else 5, iterations=1, setup=setup,
                            warmup=0 if device == "cpu" else 1, errors=errors)
    params = {"device": device, "modules": len(state["ours"][0]), "capacity_before": CAPACITY,
              "capacity_after": 2 * (CAPACITY + 1) - 1, "mode": "expand_past_capacity",
              "includes": "A, B, their grads, AdamW exp_avg / exp_avg_sq / slot_steps"}
    harness.record(request, op="growth", params=params, ours="ours", times=times,
                   path=f"expand_modules backend=auto (extension route: {route})", errors=errors,
                   benchmark=benchmark)


@pytest.mark.parametrize("device", DEVICES)
def test_adam_step(harness, request, device, benchmark):
    """One optimizer step over the adapters of all 192 modules (rank ADAM_RANK of capacity 15, fp32).

    ours: SeLoRAAdamW.step(), i.e. ops.capacity.adam_step_ (backend "auto": the extension when loaded;
    only the live slots move, with a step count per slot). Baselines over the same tensors and grads:
    adam_step_fallback (ops.capacity.adam_step_ with backend="fallback", its own state; only when the
    extension is loaded, otherwise ours is the fallback) and torch_adamw_foreach (torch.optim.AdamW,
    foreach=True, every entry of the buffers, one step count per tensor)."""
    harness.device_or_skip(device)
    from selora_kernels import SeLoRAAdamW
    from selora_kernels.ops.capacity import adam_step_

    route = _extension_route()
    modules, _ = build_modules(device, rank=ADAM_RANK, capacity=CAPACITY)
    generator = torch.Generator().manual_seed(0)
    params = []
    with torch.no_grad():
        for module in modules:
            for param in (module.lora_A, module.lora_B):
                param.grad = torch.randn(param.shape, generator=generator).to(param)
                params.append(param)
    hyper = dict(lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ours = SeLoRAAdamW(params, **hyper)
    torch_adamw = torch.optim.AdamW(params, foreach=True, **hyper)

    def run_ours():
        ours.step()
        harness.sync(device)

    def run_torch():
        torch_adamw.step()
        harness.sync(device)

    providers = {"ours": run_ours}
    errors = {}
    if route in ("aot", "jit"):
        slot_dims = [0 if param is module.lora_A else 1 for module in modules
                     for param in (module.lora_A, module.lora_B)]
        live_ranks = [module.live_rank for module in modules for _ in range(2)]
        fallback_state = [(torch.zeros_like(p), torch.zeros_like(p),
                           torch.zeros(p.shape[dim], dtype=torch.float32, device=p.device))
                          for p, dim in zip(params, slot_dims)]

        def run_fallback():
            adam_step_(params, [p.grad for p in params], [m for m, _, _ in fallback_state],
                       [v for _, v, _ in fallback_state], [t for _, _, t in fallback_state], live_ranks,
                       slot_dims, hyper["lr"], *hyper["betas"], hyper["eps"], hyper["weight_decay"],
                       backend="fallback")
            harness.sync(device)

        providers["adam_step_fallback"] = run_fallback
    else:
        errors["adam_step_fallback"] = f"skipped: extension route is {route!r}, so ours is the fallback"
    providers["torch_adamw_foreach"] = run_torch
    times = harness.measure(providers, device, rounds=5 if device == "cpu" else 10, iterations=1, errors=errors)
    params_record = {"device": device, "modules": len(modules), "tensors": len(params), "rank": ADAM_RANK,
                     "capacity": CAPACITY, "dtype": "fp32", "mode": "adam_step",
                     "entries": sum(p.numel() for p in params)}
    harness.record(request, op="adam_step", params=params_record, ours="ours", times=times,
                   path=f"SeLoRAAdamW -> ops.capacity.adam_step_ backend=auto (extension route: {route})",
                   errors=errors, benchmark=benchmark)


# ------------------------------------------------------------------------------------------------ counts
class TritonCompileCounter:
    """Counts Triton JIT compilations (new specialisations) in a region: the post-compile hook of
    triton.knobs when present, and the kernel caches of selora_kernels.kernels as a cross-check."""

    def __init__(self):
        self.events = []
        self.method = None
        self._restore = None

    def _hook(self, *args, **kwargs):
        fn = kwargs.get("fn")
        self.events.append(str(getattr(fn, "name", None) or kwargs.get("repr") or "?")[:200])
        if self._previous is not None:
            return self._previous(*args, **kwargs)
        return None

    def __enter__(self):
        self._previous = None
        try:
            from triton import knobs

            self._previous = knobs.runtime.jit_post_compile_hook
            knobs.runtime.jit_post_compile_hook = self._hook
            self._restore = lambda: setattr(knobs.runtime, "jit_post_compile_hook", self._previous)
            self.method = "triton.knobs.runtime.jit_post_compile_hook"
        except Exception:  # noqa: BLE001
            self.method = "kernel caches only"
        return self

    def __exit__(self, *exc):
        if self._restore is not None:
            self._restore()

    @staticmethod
    def cached_kernels() -> int:
        """Compiled variants held by the JIT functions of selora_kernels.kernels.* modules."""
        try:
            from triton.runtime.jit import JITFunction
        except Exception:  # noqa: BLE001
            return -1
        seen, total = set(), 0
        for name, module in list(sys.modules.items()):
            if not name.startswith("selora_kernels.kernels") or module is None:
                continue
            for value in vars(module).values():
                fn = value
                while fn is not None and not isinstance(fn, JITFunction):
                    fn = getattr(fn, "fn", None)
                if fn is None or id(fn) in seen:
                    continue
                seen.add(id(fn))
                for entry in getattr(fn, "device_caches", {}).values():
                    try:
                        total += len(entry[0])
                    except Exception:  # noqa: BLE001
                        pass
        return total


class CountingBackend:
    """torch.compile backend that counts the graphs Dynamo hands it (each is a (re)compilation)."""

    def __init__(self, inner: str):
        from torch._dynamo.backends.registry import lookup_backend

        self.inner_name = inner
        self.inner = lookup_backend(inner)
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.calls += 1
        return self.inner(gm, example_inputs)


def _unique_graphs():
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _inductor_counters(keyword):
    from torch._dynamo.utils import counters

    return {k: int(v) for k, v in counters["inductor"].items() if keyword in k}


def _make_one(device, dtype, rank, d=320, tokens=(2, 256)):
    from selora_kernels import SeLoRALinear

    gen = torch.Generator().manual_seed(5)
    module = SeLoRALinear(d, d, r_init=rank, capacity=CAPACITY).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.lora_B[:, :rank].normal_(0, 0.02, generator=gen)
    x = torch.randn(*tokens, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad_y = torch.randn(*tokens, d, generator=gen).to(device=device, dtype=dtype)
    return module, x, grad_y


def _train_step(fn, module, x, grad_y):
    x.grad = module.lora_A.grad = module.lora_B.grad = None
    module.reset_measuring()
    y = fn(x)
    y.backward(grad_y)
    return y.detach()


@pytest.mark.parametrize("device", DEVICES)
def test_growth_no_new_compilations(harness, request, device):
    harness.device_or_skip(device)
    from selora_kernels import expand_modules

    torch._dynamo.reset()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    module, x, grad_y = _make_one(device, dtype, rank=1)
    backend = CountingBackend("inductor" if device == "cuda" else "aot_eager")
    compiled = torch.compile(module, backend=backend)
    counter = TritonCompileCounter()
    new_graphs = new_dynamo = new_triton = 0
    new_cached = 0
    mismatches = []
    with counter:
        for measuring in (False, True):  # each phase: warm at rank 1, then grow 1 -> 2 -> 3
            reset_rank([module], 1)
            if measuring:
                module.start_measuring()  # one probe for the whole phase (a new probe is a new guard)
            for _ in range(2):
                _train_step(module, module, x, grad_y)
                _train_step(compiled, module, x, grad_y)
            harness.sync(device)
            graphs_before, dynamo_before = backend.calls, _unique_graphs()
            triton_before, cached_before = len(counter.events), counter.cached_kernels()
            for step, new_rank in enumerate((2, 3)):  # 1 -> 2 catches Triton's "== 1" specialisation
                expand_modules([module], seed=step)
                with torch.no_grad():
                    module.lora_B[:, new_rank - 1].normal_(0, 0.05)  # the new slot trains: output follows
                _train_step(module, module, x, grad_y)
                got = _train_step(compiled, module, x, grad_y)
                with torch.no_grad():
                    want = module(x)
                if not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2):
                    mismatches.append(f"rank {new_rank} measuring={measuring}: compiled output differs")
            harness.sync(device)
            new_graphs += backend.calls - graphs_before
            new_dynamo += _unique_graphs() - dynamo_before
            new_triton += len(counter.events) - triton_before
            if cached_before >= 0:
                new_cached += counter.cached_kernels() - cached_before
            module.stop_measuring()
    triton_used = device == "cuda" and (len(counter.events) > 0 or (counter.cached_kernels() or 0) > 0)
    if counter.method == "kernel caches only":  # no compile hook in this Triton: count cache entries
        new_triton = new_cached
    targets = [
        harness.target("zero_torch_compile_recompiles_across_growth", new_graphs, 0, "==",
                       f"graphs handed to the {backend.inner_name} backend after growths 1->2->3"),
        harness.target("zero_triton_compilations_across_growth", new_triton if triton_used else None, 0, "==",
                       "Triton JIT compilations after growths 1->2->3 (eager and compiled, measuring on/off)"),
    ]
    metrics = {"new_backend_graphs": new_graphs, "new_dynamo_unique_graphs": new_dynamo,
               "new_triton_compilations": new_triton, "new_cached_triton_kernels": new_cached,
               "triton_compilations_total": len(counter.events), "triton_counter": counter.method,
               "triton_compiled_kernels": sorted(set(counter.events)), "output_mismatches": mismatches}
    params = {"device": device, "dtype": str(dtype).replace("torch.", ""), "capacity": CAPACITY,
              "mode": "compile_counts", "backend": backend.inner_name, "growths": "1->2->3, measuring off then on"}
    harness.record(request, op="growth", params=params, ours="none", times={}, path=harness.op_path(device),
                   targets=targets, metrics=metrics,
                   notes=None if triton_used else "no Triton kernel ran: the Triton count is not applicable")
    assert not mismatches, mismatches
    assert new_graphs == 0, f"{new_graphs} torch.compile recompilation(s) across a growth within capacity"
    if triton_used:
        assert new_triton == 0, f"{new_triton} Triton compilation(s) across a growth: {counter.events[-5:]}"


@pytest.mark.gpu
def test_growth_cuda_graph_replay(harness, request):
    harness.device_or_skip("cuda")
    from selora_kernels import expand_modules

    torch._dynamo.reset()
    module, x, grad_y = _make_one("cuda", torch.bfloat16, rank=4, tokens=(8, 1024))
    compiled = torch.compile(module, mode="reduce-overhead")
    mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)

    def step():
        mark_step()
        return _train_step(compiled, module, x, grad_y).clone()

    def replay_ms(count=20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(count):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / count

    for _ in range(4):
        step()
    before_ms = replay_ms()
    graphs_before, cudagraph_before = _unique_graphs(), _inductor_counters("cudagraph")
    expand_modules([module], seed=0)
    with torch.no_grad():
        module.lora_B[:, 4].normal_()
    got = step()
    with torch.no_grad():
        want = module(x).detach()
    difference = float((got.float() - want.float()).abs().max())
    for _ in range(3):
        step()
    after_ms = replay_ms()
    new_graphs = _unique_graphs() - graphs_before
    cudagraph_after = _inductor_counters("cudagraph")
    cudagraph_delta = {k: v - cudagraph_before.get(k, 0) for k, v in cudagraph_after.items()}
    follows = difference <= 2e-2 * max(1.0, float(want.float().abs().max()))
    targets = [
        harness.target("cuda_graph_output_follows_growth", float(follows), 1.0, "==",
                       "compiled (reduce-overhead) output after growth equals eager output"),
        harness.target("zero_recompiles_across_growth_reduce_overhead", new_graphs, 0, "==",
                       "new Dynamo graphs after a growth within capacity"),
    ]
    metrics = {"max_abs_difference": difference, "new_dynamo_graphs": new_graphs,
               "cudagraph_counter_delta": cudagraph_delta, "step_ms_before_growth": before_ms,
               "step_ms_after_growth": after_ms}
    params = {"device": "cuda", "dtype": "bf16", "rank": "4->5", "capacity": CAPACITY, "tokens": 8 * 1024,
              "mode": "cuda_graph_replay"}
    harness.record(request, op="growth", params=params, ours="none", times={}, path=harness.op_path("cuda"),
                   targets=targets, metrics=metrics)
    assert follows, f"CUDA-graph replay after growth differs from eager by {difference}"
