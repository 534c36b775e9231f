"""The scale path on tiny random models: disk offload, sequential onloading, resume after a real SIGKILL, and two
real torch.distributed (gloo) processes against one."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_vq
from hf_vq.pipeline.placement import onloaded

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 4


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    d = tmp_path_factory.mktemp("deep")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def ids():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (48,), generator=g) for _ in range(8)]


def gptq(**kw):
    return hf_vq.GPTQConfig(dataset=ids(), num_samples=8, seq_len=32, group_size=32, calibration_batch_size=2, **kw)


def quantsim(**kw):
    return hf_vq.QuantSimConfig(dataset=ids(), num_samples=8, seq_len=32, weight_bits=4, block_size=32,
                                activation_bits=8, calibration_batch_size=2, **kw)


def quantized_tensors(model) -> dict[str, torch.Tensor]:
    """GPTQ's packed codes, scales and zeros; QuantSim's weight scales and activation ranges; GPTVQ's tensors."""
    suffixes = ("qweight", "scales", "qzeros", "log_scale", "quantizer.min", "quantizer.max", "vq_indices",
                "vq_codebook", "vq_codebook_scales")
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(suffixes)}


def test_config_fields():
    assert gptq(quantization_device="cuda:1").quantization_device == "cuda:1"
    with pytest.raises(hf_vq.ConfigError, match="quantization_device"):
        gptq(quantization_device="gpu0")
    with pytest.raises(hf_vq.ConfigError, match="RTNConfig does not take 'resume_dir'"):
        hf_vq.RTNConfig(resume_dir="x")
    assert "resume_dir" not in gptq(resume_dir="x").to_dict()  # a place on this machine, not part of the model


def test_disk_offload_gives_the_in_ram_model(deep_dir, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=gptq())
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" if i == 0 else "disk" for i in range(LAYERS)}}
    model = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=gptq(quantization_device="cpu"),
                                                 device_map=device_map, offload_folder=tmp_path / "offload")
    # the quantized modules of the offloaded blocks are back on disk; block 0 (in memory) stays in memory
    assert model.model.layers[2].mlp.down_proj.qweight.device.type == "meta"
    assert model.model.layers[0].mlp.down_proj.qweight.device.type == "cpu"
    assert (tmp_path / "offload" / "hf_vq_quantized" / "model.layers.2.mlp.down_proj.safetensors").is_file()
    x = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    model.save_pretrained(tmp_path / "saved")  # offloaded tensors are read back for the save
    enc = [json.loads(hf_vq.export_encodings(m, tmp_path / d).read_text()) for m, d in ((model, "e1"), (ref, "e2"))]
    assert enc[0]["param_encodings"] == enc[1]["param_encodings"]  # so is an export
    got, want = load_file(str(tmp_path / "saved" / "model.safetensors")), quantized_tensors(ref)
    assert len(want) == 3 * 7 * LAYERS and all(torch.equal(got[k], want[k]) for k in want)
    # and the checkpoint loads back with the same placement: quantized tensors (buffers) stay on disk
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map=device_map,
                                                 offload_folder=tmp_path / "offload2")
    assert again.model.layers[3].self_attn.q_proj.qweight.is_meta
    with torch.no_grad():
        assert torch.equal(again(x).logits, ref(x).logits)


def test_rtn_with_disk_offload(deep_dir, tmp_path):
    cfg = hf_vq.RTNConfig(group_size=32)
    ref = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=cfg)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" for i in range(LAYERS)}}
    model = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=hf_vq.RTNConfig(group_size=32),
                                                 device_map=device_map, offload_folder=tmp_path / "offload")
    assert model.model.layers[1].mlp.up_proj.qweight.is_meta
    x = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def adascale(**kw):
    return hf_vq.AdaScaleConfig(**{"dataset": ids(), "num_samples": 8, "seq_len": 32, "group_size": 32,
                                   "batch_size": 2, "num_iterations": 4, "early_stop_margin": None, **kw})


def adascale_one_window_per_step(**kw):
    """AdaScale stepping on one window per rank, on the FP inputs (no random input mixing): 2 ranks take the same
    steps as one process with batch_size=2."""
    return adascale(**{"batch_size": 1, "fp_input_prob": 1.0, **kw})


def gptvq_finetuned(**kw):
    """GPTVQ with block codebook fine-tuning on one window per batch (see adascale_one_window_per_step)."""
    return hf_vq.GPTVQConfig(**{"dataset": ids(), "num_samples": 8, "seq_len": 32, "vector_dim": 2, "index_bits": 4,
                                "rows_per_block": 16, "cols_per_block": 32, "kmeans_iterations": 4,
                                "finetune_iterations": 4, "calibration_batch_size": 1, **kw})


def test_adascale_with_disk_offload_and_resume(deep_dir, tmp_path):
    """AdaScale goes through the same onloading (disk-offloaded blocks loaded one at a time) and resume state
    (its FP and quantized block inputs) as GPTQ, with the in-RAM result."""
    ref = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=adascale())
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" for i in range(LAYERS)}}
    model = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=adascale(quantization_device="cpu"),
                                                 device_map=device_map, offload_folder=tmp_path / "offload")
    assert model.model.layers[1].mlp.up_proj.qweight.is_meta
    x = torch.arange(3, 40)[None]
    with torch.no_grad():
        want = ref(x).logits
        assert torch.equal(model(x).logits, want)

    # interrupted when block 2 starts, then resumed: blocks 0-1 are not trained again, same model
    from hf_vq.model import convert

    resume = tmp_path / "resume"
    model = AutoModelForCausalLM.from_pretrained(deep_dir)
    def stop(*_):
        raise KeyboardInterrupt
    handle = model.model.layers[2].register_forward_pre_hook(stop)
    with pytest.raises(KeyboardInterrupt):
        convert.quantize_model(model, adascale(resume_dir=str(resume)), ["lm_head"], progress=False)
    handle.remove()
    assert json.loads((resume / "progress.json").read_text())["finished"] == 1
    model = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=adascale(resume_dir=str(resume)))
    run = model.hf_quantizer.last_run
    assert run["resumed_blocks"] == 2 and len(run["block_iterations"]) == LAYERS - 2
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)


def test_quantsim_onloads_resumes_and_matches_whole_model_calibration(deep_dir, tmp_path):
    """QuantSim calibrates block by block: the ranges are those of a whole-model pass; disk-offloaded blocks give the
    in-RAM model; an interrupted run resumes without redoing finished blocks."""
    cfg = dict(quant_scheme="tf_enhanced")  # two passes per block (range, then histogram)
    ref = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=quantsim(**cfg))
    blockwise = quantized_tensors(ref)
    assert len([k for k in blockwise if k.endswith("quantizer.min")]) == 2 * 7 * LAYERS
    from hf_vq.pipeline.act_ranges import compute_encodings
    from hf_vq.pipeline.registry import calibration_samples

    # the same windows in one whole-model pass
    compute_encodings(ref, calibration_samples(ref, quantsim(**cfg)), "tf_enhanced", batch_size=2)
    whole = quantized_tensors(ref)
    assert all(torch.allclose(blockwise[k], whole[k], rtol=1e-5, atol=1e-7) for k in whole)

    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" if i == 0 else "disk" for i in range(LAYERS)}}
    model = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=quantsim(quantization_device="cpu",
                                                                                        **cfg),
                                                 device_map=device_map, offload_folder=tmp_path / "offload")
    assert model.model.layers[2].mlp.down_proj.latent.is_meta  # the QuantSim module of a disk block is on disk
    assert not model.model.layers[0].mlp.down_proj.latent.is_meta
    x = torch.arange(3, 40)[None]
    with torch.no_grad():
        want = ref(x).logits
        assert torch.equal(model(x).logits, want)
    ranges = {k: v for k, v in model.state_dict().items() if k.endswith(("quantizer.min", "quantizer.max"))}
    assert ranges.keys() < blockwise.keys() and all(torch.equal(v, blockwise[k]) for k, v in ranges.items())
    # saving and exporting read the offloaded modules back from disk
    model.save_pretrained(tmp_path / "saved")
    ref.save_pretrained(tmp_path / "ref")
    got, want = load_file(str(tmp_path / "saved" / "model.safetensors")), load_file(str(tmp_path / "ref" /
                                                                                     "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    enc = [json.loads(hf_vq.export_encodings(m, tmp_path / d).read_text()) for m, d in ((model, "e1"), (ref, "e2"))]
    assert enc[0]["param_encodings"] == enc[1]["param_encodings"] and len(enc[0]["param_encodings"]) == 7 * LAYERS
    assert enc[0]["activation_encodings"] == enc[1]["activation_encodings"]
    assert model.model.layers[2].mlp.down_proj.latent.is_meta  # back on disk after the export

    from hf_vq.model import convert

    resume = tmp_path / "resume"
    model = AutoModelForCausalLM.from_pretrained(deep_dir)
    calls = [0] * LAYERS
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *a, _i=i: calls.__setitem__(_i, calls[_i] + 1))

    def stop(*_):
        raise KeyboardInterrupt
    handle = model.model.layers[2].register_forward_pre_hook(stop)
    with pytest.raises(KeyboardInterrupt):
        convert.quantize_model(model, quantsim(resume_dir=str(resume), **cfg), ["lm_head"], progress=False)
    handle.remove()
    assert json.loads((resume / "progress.json").read_text())["finished"] == 1
    model = AutoModelForCausalLM.from_pretrained(deep_dir)
    calls = [0] * LAYERS
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *a, _i=i: calls.__setitem__(_i, calls[_i] + 1))
    run = convert.quantize_model(model, quantsim(resume_dir=str(resume), **cfg), ["lm_head"], progress=False)
    assert run["resumed_blocks"] == 2 and calls[:2] == [0, 0] and all(c > 0 for c in calls[2:])
    assert not resume.exists()
    got = quantized_tensors(model)
    assert got.keys() == blockwise.keys() and all(torch.equal(got[k], blockwise[k]) for k in blockwise)


def test_onloaded_restores_offloaded_weights(deep_dir, tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" for i in range(LAYERS)}}
    model = AutoModelForCausalLM.from_pretrained(deep_dir, device_map=device_map, offload_folder=tmp_path / "off")
    block = model.model.layers[1]
    assert block.mlp.up_proj.weight.device.type == "meta"
    with onloaded(block, torch.device("cpu")):
        w = block.mlp.up_proj.weight
        assert w.device.type == "cpu" and w.abs().sum() > 0
        w.data.zero_()  # what the runner does (writes the quantized weight): the forward must see it
        x = torch.randn(1, 5, 64)
        pos = model.model.rotary_emb(x, torch.arange(5)[None])
        out = block(x, position_embeddings=pos, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(out).all()
        assert block.mlp.up_proj.weight.abs().sum() == 0  # not re-loaded from the offload folder by the hook
    assert block.mlp.up_proj.weight.device.type == "meta"
    assert block.mlp.up_proj._hf_hook.offload  # the hook offloads again


# {config}: a config function of {module}; the kill comes in the quantizing run (run_sequential), not in a pass before
# it (mixed precision's sensitivity pass runs the blocks too)
KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    from torch.nn.modules.module import register_module_forward_pre_hook
    from transformers import AutoModelForCausalLM
    from {module} import {config}

    def in_the_quantizing_run():
        f = sys._getframe()
        while f is not None and f.f_code.co_name != "run_sequential":
            f = f.f_back
        return f is not None

    def kill(module, args):  # a real kill when block {k} + 1 starts calibrating: blocks 0..{k} are finished
        if (type(module).__name__ == "LlamaDecoderLayer" and module.self_attn.layer_idx == {k} + 1
                and in_the_quantizing_run()):
            os.kill(os.getpid(), signal.SIGKILL)

    register_module_forward_pre_hook(kill)
    AutoModelForCausalLM.from_pretrained({model!r}, quantization_config={config}(resume_dir={resume!r}))
""")


def test_resume_after_sigkill_equals_the_uninterrupted_run(deep_dir, tmp_path):
    k = 1
    resume = tmp_path / "resume"
    script = KILL_SCRIPT.format(root=str(ROOT), model=str(deep_dir), k=k, resume=str(resume), module="tests.test_scale",
                                config="gptq")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads((resume / "progress.json").read_text())["finished"] == k
    assert not list(resume.glob("*.tmp"))

    # a different config must not pick up this state
    with pytest.raises(ValueError, match="another config"):
        AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=gptq(resume_dir=str(resume), seed=1))

    # resumed through quantize_model on a float model: the quantizer's own changes to the model config around a
    # from_pretrained run (use_cache, quantization_config) are not part of what must match
    calls = [0] * LAYERS
    model = AutoModelForCausalLM.from_pretrained(deep_dir)
    for i, layer in enumerate(model.model.layers):
        # completed forwards (the capture of block 0's inputs stops inside block 0's pre-hook)
        layer.register_forward_hook(lambda *a, _i=i: calls.__setitem__(_i, calls[_i] + 1))
    from hf_vq.model import convert
    run = convert.quantize_model(model, gptq(resume_dir=str(resume)), ["lm_head"], progress=False)
    assert calls[:k + 1] == [0] * (k + 1) and all(c > 0 for c in calls[k + 1:])  # blocks 0..k not redone
    assert run["resumed_blocks"] == k + 1
    assert not resume.exists()  # removed once the run completed

    ref = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=gptq())
    got, want = quantized_tensors(model), quantized_tensors(ref)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


DIST_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from tests.test_scale import adascale_one_window_per_step, gptq, gptvq_finetuned, quantized_tensors, quantsim
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained({model!r}, quantization_config={method}())
    run = model.hf_quantizer.last_run
    with torch.no_grad():
        logits = model(torch.arange(3, 67)[None]).logits.contiguous()
    save_file({{**quantized_tensors(model), "logits": logits}},
              os.path.join({out!r}, f"rank{{dist.get_rank()}}.safetensors"),
              metadata={{"processes": str(run["processes"]), "windows": str(run["windows"])}})
    dist.destroy_process_group()
""")


def _launch(nproc: int, deep_dir, out: Path, port: int, method: str = "gptq", script_text: str = DIST_SCRIPT) -> None:
    script = out / "run.py"
    script.write_text(script_text.format(root=str(ROOT), model=str(deep_dir), out=str(out), method=method))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from tests.arch_models import configs, save_tiny

    cls, cfg = configs()["qwen3_moe"]
    d = tmp_path_factory.mktemp("moe")
    save_tiny("qwen3_moe", cls, cfg, d)
    return d


# Rank r runs windows r, r + 2, ... in one batch of 4; one process given the windows in this order runs the same two
# batches, so every window's activations come from the same batched forward and the Hessian sum is (rank 0's batch)
# + (rank 1's batch) either way. Each batch has 4 x 32 = 128 token rows: below the row count up to which the BLAS
# adds x.T @ x into the running sum in one step, so the sum in one process is bit-equal to the all-reduced one.
RANK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def windows(order=tuple(range(8))) -> torch.Tensor:
    return torch.stack([ids()[i][:32] for i in order])


def gptq_whole_batches(order=tuple(range(8))):
    """GPTQ with one calibration batch per rank (2 ranks), on the windows in ``order``."""
    return hf_vq.GPTQConfig(dataset=windows(order), group_size=32, calibration_batch_size=4)


def record_run(model_dir, one_process: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """An RTN recording run (tests/runs.py: the Hessian each layer is solved with, expert token counts, codes) and
    a GPTQ run with the same batches: ({"H:"/"rtn:"/"gptq:" + name: tensor}, {"experts": expert token counts,
    "windows": the windows this process ran})."""
    from tests.runs import rtn_run_recording_statistics

    order = RANK_ORDER if one_process else tuple(range(8))
    results, hessians, counts = rtn_run_recording_statistics(model_dir, windows(order), batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=gptq_whole_batches(order))
    return {**{"H:" + n: h.contiguous() for n, h in hessians.items()},
            **{"rtn:" + n: r.codes.contiguous() for n, r in results.items()},
            **{"gptq:" + n: t for n, t in quantized_tensors(model).items()}}, \
        {"experts": counts, "windows": model.hf_quantizer.last_run["windows"]}


RECORD_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    sys.path.insert(0, {root!r})
    import torch.distributed as dist
    from safetensors.torch import save_file
    from tests.test_scale import record_run
    torch.set_num_threads(1)
    tensors, counts = record_run({model!r}, one_process=False)
    save_file(tensors, os.path.join({out!r}, f"rank{{dist.get_rank()}}.safetensors"),
              metadata={{"counts": json.dumps(counts)}})
    dist.destroy_process_group()
""")


def _recorded(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["counts"])


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_two_gloo_processes_match_one(arch, deep_dir, moe_dir, tmp_path):
    """Dense Llama, and Qwen3-MoE (per-expert routed-token Hessians and counts summed over ranks): the Hessians each
    layer is solved with, the expert token counts and the codes (RTN and GPTQ) of 2 gloo ranks are exactly those of
    one process that ran the same batches."""
    model_dir = deep_dir if arch == "llama" else moe_dir
    _launch(2, model_dir, tmp_path, free_port(), script_text=RECORD_SCRIPT)
    (r0, counts0), (r1, counts1) = [_recorded(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        one, one_counts = record_run(model_dir, one_process=True)
    finally:
        torch.set_num_threads(threads)

    hess = {k for k in one if k.startswith("H:")}
    layers = 7 * LAYERS if arch == "llama" else 2 * (4 + 2 * 4)
    assert len(hess) == layers
    # each layer is solved (and its Hessian recorded) by exactly one rank, with the Hessian summed over both ranks
    h0, h1 = {k for k in r0 if k.startswith("H:")}, {k for k in r1 if k.startswith("H:")}
    assert h0 and h1 and not h0 & h1 and h0 | h1 == hess
    for k in hess:
        got = (r0 if k in h0 else r1)[k]
        assert torch.equal(got, one[k]), (k, float((got - one[k]).abs().max()))
    # every rank holds every layer's codes
    assert r0.keys() - h0 == r1.keys() - h1 == one.keys() - hess
    for k in one.keys() - hess:
        assert torch.equal(r0[k], one[k]) and torch.equal(r1[k], one[k]), k
    # GPTQ: every Linear, and each fused experts module's gate_up_qweight and down_qweight
    qweights = [k for k in one if k.startswith("gptq:") and k.endswith("qweight")]
    assert len(qweights) == (7 * LAYERS if arch == "llama" else (4 + 2) * 2)
    assert counts0["windows"] == counts1["windows"] == 4 and one_counts["windows"] == 8  # each rank ran half
    experts = one_counts["experts"]
    assert counts0["experts"] == counts1["experts"] == experts
    if arch == "qwen3_moe":
        assert len(experts) == 2 and all(c["tokens"] == 8 * 32 for c in experts.values())
        # top-2 routing: every token is counted twice over the experts
        assert all(sum(c["routed_tokens"]) == 2 * 8 * 32 for c in experts.values())
    else:
        assert experts == {}


def test_two_gloo_processes_quantsim(deep_dir, tmp_path):
    """QuantSim under torch.distributed: each rank observes half the windows; the min/max are reduced over ranks, so
    both ranks end with the ranges of one process that saw every window."""
    _launch(2, deep_dir, tmp_path, free_port(), method="quantsim")
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    one = quantized_tensors(AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=quantsim()))
    ranges = [k for k in one if k.endswith(("quantizer.min", "quantizer.max"))]
    assert len(ranges) == 2 * 2 * 7 * LAYERS
    # the same maxima over the same activations (each window's rows computed in a batch of 2 either way)
    assert all(torch.allclose(r0[k], one[k], rtol=1e-6, atol=0) for k in ranges)


@pytest.mark.parametrize("method", ["adascale_one_window_per_step", "gptvq_finetuned"])
def test_two_gloo_processes_block_training(method, deep_dir, tmp_path):
    """Block training under torch.distributed (AdaScale; GPTVQ codebook fine-tuning): Hessians summed over ranks,
    each Adam step averages the ranks' gradients. 2 ranks stepping on one window each take the steps of one process
    stepping on both windows."""
    _launch(2, deep_dir, tmp_path, free_port(), method=method)
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)  # every rank: the same model
    make = globals()[method]
    single = AutoModelForCausalLM.from_pretrained(deep_dir, quantization_config=make(
        **{"batch_size" if method.startswith("adascale") else "calibration_batch_size": 2}))
    one = quantized_tensors(single)
    assert len(one) >= 2 * 7 * LAYERS and one.keys() | {"logits"} == r0.keys()
    differ = sum(int((one[k] != r0[k]).sum()) for k in one) / sum(one[k].numel() for k in one)
    with torch.no_grad():
        logits = single(torch.arange(3, 67)[None]).logits
    rel = float((r0["logits"] - logits).norm() / logits.norm())
    print(f"{method}: 2 gloo ranks vs 1 process: {differ:.4%} of stored values differ, relative logit diff {rel:.2e}")
    assert differ < 0.01 and rel < 1e-3


@pytest.mark.parametrize("method", ["gptq", "quantsim"])
def test_fused_experts_with_disk_offload(method, moe_dir, tmp_path):
    """Fused MoE experts on disk: unfused one module at a time onto disk, calibrated with their block, fused back
    onto disk; the in-RAM model's logits."""
    make = globals()[method]
    ref = AutoModelForCausalLM.from_pretrained(moe_dir, quantization_config=make())
    n = ref.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" if i == 0 else "disk" for i in range(n)}}
    model = AutoModelForCausalLM.from_pretrained(moe_dir, quantization_config=make(quantization_device="cpu"),
                                                 device_map=device_map, offload_folder=tmp_path / "offload")
    experts = model.model.layers[n - 1].mlp.experts
    assert type(experts).__name__ == "QuantExperts" and all(b.is_meta for b in experts.buffers(recurse=False))
    assert not any(b.is_meta for b in model.model.layers[0].mlp.experts.buffers(recurse=False))
    x = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
