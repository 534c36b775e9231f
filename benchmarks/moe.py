"""MoE with a known answer: SmolLM2-135M upcycled into a Mixtral model (8 experts, top-2, every expert a copy of its
block's dense MLP, random router). Mixtral renormalises the top-2 weights to sum 1 and the experts are equal, so the
float MoE computes the dense model's function; its quantized versions should stay close to dense GPTQ.

Rows: FP dense, FP MoE (plus the largest logit difference to dense), dense GPTQ 4-bit g128, MoE GPTQ with routed and
with all-token expert calibration, and a biased router (one expert per layer pushed under 1% of the calibration
tokens) in both modes. Austen protocol (hf_vq.assets): calibration windows from Emma, perplexity on Pride and Prejudice
+ Persuasion. Also the batch-1 decode time of the float and the quantized experts.

    OMP_NUM_THREADS=1 python benchmarks/moe.py --num-samples 16 --seq-len 512 --windows 8
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

import hf_vq
from hf_vq import assets
from hf_vq.model import convert
from hf_vq.pipeline.data import build_calibration

RARE = 7  # the expert the biased router starves


def upcycle(dense, experts: int = 8, top_k: int = 2, seed: int = 0) -> MixtralForCausalLM:
    c = dense.config
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
                        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
                        num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None,
                        router_jitter_noise=0.0, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                        pad_token_id=c.pad_token_id)
    moe = MixtralForCausalLM(cfg)
    sd = {}
    g = torch.Generator().manual_seed(seed)
    for k, v in dense.state_dict().items():
        if ".mlp." not in k:
            sd[k] = v
    for i, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight.data, mlp.up_proj.weight.data])
        sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up[None].expand(experts, -1, -1).clone()
        sd[f"model.layers.{i}.mlp.experts.down_proj"] = mlp.down_proj.weight.data[None].expand(experts, -1, -1).clone()
        sd[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(experts, c.hidden_size, generator=g) * 0.02
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    moe.tie_weights()
    return moe.eval()


@torch.no_grad()
def mlp_inputs(dense, samples: torch.Tensor) -> list[torch.Tensor]:
    """The input of every block's MLP (the router's input) on the calibration windows, [tokens, hidden]."""
    got = [[] for _ in dense.model.layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, a, _i=i: got[_i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(dense.model.layers)]
    try:
        for s in samples.split(4):
            dense(input_ids=s, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(x) for x in got]


@torch.no_grad()
def bias_router(moe, inputs: list[torch.Tensor], target: float = 0.005, rare: int = RARE) -> list[float]:
    """Steer router row ``rare`` against each layer's mean router input until that expert gets about ``target`` of the
    (token, slot) choices; returns the share it gets per layer."""
    shares = []
    for layer, x in zip(moe.model.layers, inputs):
        w = layer.mlp.gate.weight
        mean = x.mean(0)
        base = w[rare].clone()
        lo, hi = 0.0, 1.0
        def share(beta):
            w[rare] = base - beta * mean / mean.norm() ** 2
            idx = torch.topk(x @ w.T, 2, dim=-1).indices
            return float((idx == rare).float().mean())
        while share(hi) > target and hi < 1e6:
            hi *= 4
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if share(mid) > target else (lo, mid)
        shares.append(share(hi))
    return shares


def ppl(model, tok, text, seq_len, windows):
    return hf_vq.evaluate_perplexity(model, tok, text, seq_len=seq_len, max_tokens=windows * seq_len)


def gptq(model, tok, calib_text, args, mode="routed"):
    cfg = hf_vq.GPTQConfig(bits=4, group_size=128, dataset=[calib_text], tokenizer=tok, num_samples=args.num_samples,
                           seq_len=args.seq_len, expert_calibration=mode)
    t0 = time.perf_counter()
    run = convert.quantize_model(model, cfg, ["lm_head"], progress=False)
    model.config.quantization_config = cfg
    return run, time.perf_counter() - t0


@torch.no_grad()
def decode_ms(model, tok, steps: int = 32) -> float:
    ids = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up (kernel repacking)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    assert out.shape[1] == ids.shape[1] + steps
    return 1000 * (time.perf_counter() - t0) / steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--rows", default="fp,dense,routed,all,biased-routed,biased-all,decode")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = args.rows.split(",")
    path = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    calib_text, test_text = assets.austen_calibration_text(), assets.austen_test_text()
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {}

    def report(name, **kw):
        out[name] = kw
        print(json.dumps({"row": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in kw.items()}}),
              flush=True)

    moe = upcycle(dense)
    if "fp" in rows:
        ids = tok(test_text[:4000], return_tensors="pt").input_ids[:, :args.seq_len]
        with torch.no_grad():
            a, b = dense(ids).logits, moe(ids).logits
        report("fp-dense", ppl=ppl(dense, tok, test_text, args.seq_len, args.windows))
        report("fp-moe", ppl=ppl(moe, tok, test_text, args.seq_len, args.windows),
               max_abs_logit_diff=float((a - b).abs().max()), rel_logit_diff=float((a - b).norm() / b.norm()))
    if "dense" in rows:
        q = copy.deepcopy(dense)
        run, secs = gptq(q, tok, calib_text, args)
        report("gptq-dense", ppl=ppl(q, tok, test_text, args.seq_len, args.windows), quantize_s=secs)
        del q
    samples = build_calibration([calib_text], tok, args.num_samples, args.seq_len, 0)
    variants = [(r, r.removeprefix("biased-"), r.startswith("biased")) for r in rows
                if r in ("routed", "all", "biased-routed", "biased-all")]
    inputs = mlp_inputs(dense, samples) if any(b for *_, b in variants) else None
    for name, mode, biased in variants:
        q = copy.deepcopy(moe)
        if biased:
            shares = bias_router(q, inputs)
            assert max(shares) < 0.01, shares
        run, secs = gptq(q, tok, calib_text, args, mode)
        fallback = {n: sorted(map(int, r.get("fallback", {}))) for n, r in run["experts"].items() if r.get("fallback")}
        report(f"gptq-moe-{name}", ppl=ppl(q, tok, test_text, args.seq_len, args.windows), quantize_s=secs,
               fallback_layers=len(fallback), min_routed=min(min(r["routed_tokens"]) for r in run["experts"].values()),
               rare_share_max=max(shares) if biased else None, warnings=len(run["warnings"]))
        if "decode" in rows and name == "routed":
            report("decode-ms-per-token", float_moe=decode_ms(moe, tok), gptq_moe=decode_ms(q, tok),
                   float_dense=decode_ms(dense, tok))
        del q
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
