"""Mixed precision (average_bits) where uniform runs go: fused MoE experts (GPTQ and GPTVQ), disk offload,
torch.distributed (2 gloo processes) and resume after a kill. Tiny random models (tests/test_scale.py's)."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.nn.experts import QuantExperts, VQExperts
from tests.arch_models import logits
from tests.test_scale import (KILL_SCRIPT, LAYERS, ROOT, _launch, deep_dir, free_port, ids,  # noqa: F401
                              moe_dir, quantized_tensors)

AFFINE = [{"bits": b, "group_size": 32} for b in (2, 4, 8)]
VQ = [{"vector_dim": 2, "index_bits": b, "rows_per_block": r} for b, r in ((4, 8), (6, 16), (8, 32))]


def gptq_mixed(**kw):
    return hf_vq.GPTQConfig(**{"dataset": ids(), "num_samples": 8, "seq_len": 32, "average_bits": 4.5,
                               "candidates": AFFINE, "calibration_batch_size": 2, **kw})


def gptvq_mixed(**kw):
    return hf_vq.GPTVQConfig(**{"dataset": ids(), "num_samples": 8, "seq_len": 32, "average_bits": 3.6,
                                "candidates": VQ, "cols_per_block": 32, "kmeans_iterations": 4,
                                "calibration_batch_size": 2, **kw})


def stored_bits(model) -> tuple[float, int]:
    from hf_vq.model.allocation import layer_bits

    recs = layer_bits(model).values()
    return sum(b * w for _, b, w in recs), sum(w for _, _, w in recs)


@pytest.mark.usefixtures("exact_kernels")
@pytest.mark.parametrize("method", ["gptq_mixed", "gptvq_mixed"])
def test_fused_experts_are_one_unit_within_the_budget(method, moe_dir, tmp_path):
    """Each fused experts module gets one setting for all its experts and projections, counted in the budget; the
    checkpoint reloads to the same logits."""
    cfg = globals()[method]()
    model = AutoModelForCausalLM.from_pretrained(moe_dir, quantization_config=cfg)
    alloc = model.config.quantization_config.allocation
    units = model.hf_quantizer.last_run["allocation"]["units"]
    experts = [n for n in alloc if n.endswith("mlp.experts")]
    assert experts == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"] and set(units) == set(alloc)
    assert not any(".experts." in n for n in alloc)   # no per-expert entries
    kind = QuantExperts if method == "gptq_mixed" else VQExperts
    for name in experts:
        mod = model.get_submodule(name)
        assert isinstance(mod, kind)
        record = model.config.quantization_config.layers[name]
        for proj in ("gate_up", "down"):
            assert {k: record[proj][k] for k in alloc[name]} == alloc[name]
    bits, weights = stored_bits(model)
    assert bits / weights <= cfg.average_bits
    assert bits / weights == pytest.approx(model.hf_quantizer.last_run["allocation"]["achieved_bits"])
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.arange(3, 40)[None]
    assert torch.equal(logits(again, x), logits(model, x))


def test_disk_offload_gives_the_in_ram_allocation_and_model(deep_dir, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=gptq_mixed())
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" if i == 0 else "disk" for i in range(LAYERS)}}
    model = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=gptq_mixed(quantization_device="cpu"),
                                                 device_map=device_map, offload_folder=tmp_path / "offload")
    assert model.model.layers[2].mlp.down_proj.qweight.is_meta
    alloc = model.config.quantization_config.allocation
    assert alloc == ref.config.quantization_config.allocation and len({e["bits"] for e in alloc.values()}) > 1
    x = torch.arange(3, 40)[None]
    assert torch.equal(logits(model, x), logits(ref, x))


MIXED_DIST_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    sys.path.insert(0, {root!r})
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from tests.test_mixed_scale import {method}
    from tests.test_scale import quantized_tensors
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained({model!r}, quantization_config={method}())
    save_file(quantized_tensors(model), os.path.join({out!r}, f"rank{{dist.get_rank()}}.safetensors"),
              metadata={{"allocation": json.dumps(model.config.quantization_config.allocation),
                         "processes": str(model.hf_quantizer.last_run["processes"])}})
    dist.destroy_process_group()
""")


def test_two_gloo_processes_choose_what_one_process_chooses(deep_dir, tmp_path):
    """2 ranks, each with half the calibration windows: Hessians and Fisher weights are summed over the ranks, so
    both ranks choose the allocation one process chooses from all windows, and hold the same model."""
    from safetensors import safe_open

    _launch(2, deep_dir, tmp_path, free_port(), method="gptq_mixed", script_text=MIXED_DIST_SCRIPT)
    meta = []
    for r in (0, 1):
        with safe_open(str(tmp_path / f"rank{r}.safetensors"), "pt") as f:
            meta.append(f.metadata())
    assert meta[0]["processes"] == "2"
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        one = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=gptq_mixed())
    finally:
        torch.set_num_threads(threads)
    alloc = one.config.quantization_config.allocation
    assert json.loads(meta[0]["allocation"]) == json.loads(meta[1]["allocation"]) == alloc
    assert len({e["bits"] for e in alloc.values()}) > 1


def test_resume_after_a_kill_equals_the_uninterrupted_mixed_run(deep_dir, tmp_path):
    k = 1
    resume = tmp_path / "resume"
    script = KILL_SCRIPT.format(root=str(ROOT), model=str(deep_dir), k=k, resume=str(resume),
                                module="tests.test_mixed_scale", config="gptq_mixed")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads((resume / "progress.json").read_text())["finished"] == k
    # another budget is another config: its run must not pick up this state
    with pytest.raises(ValueError, match="another config"):
        AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=gptq_mixed(average_bits=5.0,
                                                                                      resume_dir=str(resume)))
    model = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=gptq_mixed(resume_dir=str(resume)))
    assert model.hf_quantizer.last_run["resumed_blocks"] == k + 1
    ref = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=gptq_mixed())
    assert model.config.quantization_config.allocation == ref.config.quantization_config.allocation
    got, want = quantized_tensors(model), quantized_tensors(ref)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
