"""hf_vq.optimize(model): the fastest decode this machine allows, prepared once, ready for ``generate()``.

- Every quantized Linear chooses its kernel now (``HF_VQ_KERNELS`` decides among them) and packs it, so no call
  looks anything up or packs anything later.
- The KV cache becomes transformers' static cache (preallocated, no per-token ``cat``).
- ``compile=True`` also compiles the decode step with ``torch.compile`` (hf_vq's kernels are torch custom ops, so
  the graph holds them whole). The warm-up (first generate, which compiles) is timed and reported; a compile that
  fails, or a compiled step slower than the eager one, falls back to the eager step with one warning.

What was done is in ``model.hf_vq_optimize`` (a dict) and in the log.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from torch import nn

from hf_vq.model.attention import use_decode_attention
from hf_vq.model.decode_layer import decode_step_layers
from hf_vq.model.decode_stack import decode_step_stack
from hf_vq.model.decode_step import decode_step_attention
from hf_vq.model.targets import output_head
from hf_vq.nn.base import KernelDispatch
from hf_vq.nn.dense import FloatLinear
from hf_vq.nn.kernel_registry import kernels_for
from hf_vq.nn.norm import adopt_rms_norm
from hf_vq.nn.shared_input import SharedInputGroup

log = logging.getLogger(__name__)


def _offloaded(module: nn.Module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return bool(getattr(hook, "offload", False)) or any(t.device.type == "meta" for t in module.buffers(recurse=False))


def float_head_kernels(model: nn.Module) -> str | None:
    """Let the model's output head, when hf_vq left it a plain float nn.Linear, run through the float kernels
    (:class:`FloatLinear`, in place: tied weights stay tied). Returns the head's name, or None when there is no such
    head or accelerate's hooks manage it. On CPU a decode token's head product then reads its weight at close to
    memory bandwidth (``benchmarks/kernel_speed.py``) instead of torch's single-row GEMM rate."""
    name = output_head(model)
    head = model.get_submodule(name) if name else None
    if head is None or type(head) is not nn.Linear or hasattr(head, "_hf_hook"):
        return None
    FloatLinear.adopt(head)
    return name


def norm_kernels(model: nn.Module) -> int:
    """Let the model's float RMSNorm modules run through the registry's RMSNorm kernels (in place, where the
    module's own forward computes what the kernel does); returns how many were adopted."""
    return sum(adopt_rms_norm(m) for m in list(model.modules()) if type(m).__name__.endswith("RMSNorm"))


# children of one module that transformers' architectures call with the same input tensor
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"))


def shared_input_groups(model: nn.Module) -> int:
    """Group each module's quantized q/k/v (and gate/up) projections so that a decode row computes them in one
    kernel call (:class:`SharedInputGroup`; nothing is prepared until the first decode row); returns how many
    groups were made."""
    count = 0
    for parent in model.modules():
        for names in SHARED_INPUTS:
            members = [parent._modules.get(n) for n in names]
            members = [m for m in members if isinstance(m, KernelDispatch) and not isinstance(m, FloatLinear)
                       and m._shared_input is None and not getattr(m, "exact_decode", False) and not _offloaded(m)
                       and any(k.fuse is not None for k in kernels_for(m.storage))]
            if len(members) >= 2:
                SharedInputGroup(members)
                count += 1
    return count


def decode_kernels(model: nn.Module) -> dict:
    """What hf_vq prepares for a fast decode step on every load, beyond each quantized layer's own kernel: the
    float output head and RMSNorms through their kernels, sibling projections that share an input grouped into
    one call, and the decode step's attention through hf_vq's kernel (:mod:`hf_vq.model.attention`). Returns what
    was done."""
    return {"head": float_head_kernels(model), "rms_norms": norm_kernels(model),
            "shared_input_groups": shared_input_groups(model), "decode_attention": use_decode_attention(model),
            "decode_step_attention": decode_step_attention(model), "decode_step_layers": decode_step_layers(model),
            "decode_step_stack": decode_step_stack(model)}


def fix_kernels(model: nn.Module) -> dict[str, int]:
    """Prepare and pin each quantized Linear's kernel (and the float head's); returns how many layers each kernel
    (or "exact") serves. Modules offloaded by accelerate keep choosing per call (their tensors come and go)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, KernelDispatch) and not _offloaded(module):
            kernel = module.fix_kernel()
            name = kernel.name if kernel is not None else "exact"
            counts[name] = counts.get(name, 0) + 1
    return counts


class _StepClock:
    """A logits processor that only notes when each generated token's logits arrive."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _warm_up(model, tokens: int) -> tuple[float, float | None]:
    """Generate ``tokens`` tokens from a short prompt: (seconds in all, median ms per decode step; None below 2
    steps). A step is the time between two tokens' logits, so the prefill and a compile on the first step drop out."""
    from transformers import LogitsProcessorList

    ids = torch.zeros(1, 8, dtype=torch.long, device=model.device)
    clock = _StepClock()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    total = time.perf_counter() - t0
    steps = sorted(b - a for a, b in zip(clock.times, clock.times[1:]))
    return total, (1e3 * steps[len(steps) // 2] if steps else None)


def optimize(model, *, compile: bool | str = False, static_cache: bool | None = None, warmup_tokens: int = 4):
    """Prepare ``model`` (a transformers model, quantized by hf_vq or not) for fast ``generate()``; returns it.

    compile: also ``torch.compile`` the decode step (transformers' generate compiles it on the first call; here that
        call is the warm-up, so its cost shows up front and in the report). The warm-up times the eager and the
        compiled decode step (``eager_ms_per_token``, ``compiled_ms_per_token`` in the report) and keeps the compiled
        one only where it is faster, with one warning otherwise: on CPU hf_vq's eager step runs a Llama-family layer
        in one or two C calls, which a compiled graph cannot use, so compiling is usually slower there. ``"always"`` keeps
        it compiled regardless. Opt-in: compiling takes tens of seconds.
    static_cache: preallocated KV cache (``generation_config.cache_implementation = "static"``). None (default): only
        with ``compile``, or where the model has no one-call decode step (hf_vq.model.decode_stack), which runs on
        transformers' default cache and is faster than any static-cache step.
    warmup_tokens: tokens the warm-up generates (0: no warm-up, no timing; with ``compile`` the first real call then
        compiles). Timing needs at least 3.
    """
    from transformers.generation.configuration_utils import CompileConfig

    if compile not in (False, True, "always"):
        raise ValueError(f"hf_vq.optimize: compile must be False, True or 'always', not {compile!r}")
    decode = decode_kernels(model)
    if static_cache is None:
        static_cache = bool(compile) or not decode["decode_step_stack"]
    report = {"decode": decode, "kernels": fix_kernels(model), "static_cache": static_cache, "compiled": False,
              "warmup_s": 0.0}
    gen = model.generation_config
    if static_cache:
        gen.cache_implementation = "static"
    if compile and warmup_tokens:
        report["warmup_s"], report["eager_ms_per_token"] = _warm_up(model, warmup_tokens)
    if compile:
        cfg = CompileConfig(fullgraph=False, dynamic=False, mode="default" if model.device.type == "cpu" else
                            "reduce-overhead")
        cfg._compile_all_devices = True   # transformers compiles on accelerators only unless told
        gen.compile_config = cfg
        gen.disable_compile = False
    if warmup_tokens:
        try:
            seconds, ms = _warm_up(model, warmup_tokens)
            report["warmup_s"] += seconds
            report["compiled"] = bool(compile)
            if compile:
                report["compiled_ms_per_token"] = ms
        except Exception as e:  # noqa: BLE001  (any compile failure: fall back to the eager step)
            if not compile:
                raise
            warnings.warn(f"hf_vq.optimize: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); the decode "
                          "step stays eager", RuntimeWarning, stacklevel=2)
            gen.compile_config, gen.disable_compile = None, True
            torch._dynamo.reset()
            report["warmup_s"] += _warm_up(model, warmup_tokens)[0]
        eager, compiled = report.get("eager_ms_per_token"), report.get("compiled_ms_per_token")
        if report["compiled"] and compile != "always" and eager and compiled and compiled > eager:
            warnings.warn(f"hf_vq.optimize: the compiled decode step took {compiled:.2f} ms per token against the "
                          f"eager step's {eager:.2f} ms; the decode step stays eager (compile='always' keeps it "
                          "compiled)", RuntimeWarning, stacklevel=2)
            gen.compile_config, gen.disable_compile = None, True
            report["compiled"] = False
    else:
        report["compiled"] = bool(compile)
    model.hf_vq_optimize = report
    log.info("hf_vq.optimize: kernels %s, static cache %s, compiled %s, warm-up %.1f s", report["kernels"],
             static_cache, report["compiled"], report["warmup_s"])
    return model
