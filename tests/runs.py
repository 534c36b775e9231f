"""Runs shared by several test files."""

import torch
from transformers import AutoModelForCausalLM


def rtn_run_recording_hessians(model_dir, calib_ids, reuse_frozen: bool, **run_kw):
    """run_sequential over every decoder Linear with RTN as the algorithm (its codes ignore the Hessian, so float
    noise cannot cascade through rounding decisions): (results, the Hessian each layer was given)."""
    from hf_vq.algorithms.rtn import rtn_weight
    from hf_vq.pipeline.runner import run_sequential

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    hessians = {}

    def fn(name, lin, h):
        hessians[name] = h.clone()
        return rtn_weight(lin.weight.data, 4, 32, sym=False)

    results, _ = run_sequential(model, calib_ids, targets, fn, batch_size=4, reuse_frozen=reuse_frozen,
                                progress=False, **run_kw)
    return results, hessians
