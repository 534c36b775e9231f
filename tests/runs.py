"""Runs shared by several test files."""

import torch
from transformers import AutoModelForCausalLM


def rtn_run_recording_hessians(model_dir, calib_ids, reuse_frozen: bool, **run_kw):
    """run_sequential over every decoder Linear with RTN as the algorithm (its codes ignore the Hessian, so float
    noise cannot cascade through rounding decisions): (results, the Hessian each layer was given)."""
    results, hessians, _ = rtn_run_recording_statistics(model_dir, calib_ids, reuse_frozen=reuse_frozen, **run_kw)
    return results, hessians


def rtn_run_recording_statistics(model_dir, calib_ids, reuse_frozen: bool = True, batch_size: int = 4, **run_kw):
    """As rtn_run_recording_hessians, with fused MoE experts unfused into per-expert Linears as a quantization run
    does (routed calibration): (results, Hessians, {experts module: {"tokens", "routed_tokens"}}). Under
    torch.distributed a layer's Hessian is recorded only by the rank that solves it."""
    from hf_vq.algorithms.rtn import rtn_weight
    from hf_vq.model import experts as experts_mod
    from hf_vq.pipeline.runner import run_sequential
    from hf_vq.utils.modules import set_module

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    unfused = {}
    for name, mod in list(model.named_modules()):
        if (layout := experts_mod.experts_layout(mod, name)) is not None:
            unfused[name] = experts_mod.unfuse(mod, layout, "routed", 0.01)
            set_module(model, name, unfused[name])
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    hessians = {}

    def fn(name, lin, h):
        hessians[name] = h.clone()
        return rtn_weight(lin.weight.data, 4, 32, sym=False)

    results, _ = run_sequential(model, calib_ids, targets, fn, batch_size=batch_size, reuse_frozen=reuse_frozen,
                                progress=False, **run_kw)
    counts = {name: {"tokens": cal.report["tokens"], "routed_tokens": cal.report["routed_tokens"]}
              for name, cal in unfused.items()}
    return results, hessians, counts
