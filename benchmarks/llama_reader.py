"""Perplexity and batch-1 decode speed of a GGUF file in llama.cpp (llama-cpp-python), printed as one JSON line.

Runs inside the reader venv built by ``benchmarks/setup_readers.sh llama`` (``.cache/readers/llama``); it does not
import hf_vq or torch, so what it measures is llama.cpp's own loading of the file. Perplexity follows
``hf_vq.evaluate_perplexity``: the first ``max_tokens`` token ids are cut into non-overlapping windows of
``seq_len`` tokens (stride = seq_len, no BOS added, at most ``max_windows``), each window is evaluated from an empty
KV cache, and ppl = exp(mean NLL of every predicted token, i.e. seq_len - 1 per window), computed in float64.

Token ids come from llama.cpp's own tokenizer (``--text``, several files joined with a blank line like
``hf_vq.assets.austen_test_text``) or, for a like-for-like comparison with hf_vq, from ``--token-ids``: a JSON list
of ids (or {"input_ids": [...]}) written with the HF tokenizer. With both, the ids are scored and the JSON says
whether llama.cpp's tokens agree with them.

Decode: the first ``--prompt-tokens`` ids are evaluated as one batch, then ``--gen-tokens`` tokens are generated
greedily one at a time; tokens/s = gen_tokens / time of that loop (prompt excluded).

    .cache/readers/llama/bin/python benchmarks/llama_reader.py model.gguf --text a.txt b.txt \\
        --seq-len 512 --max-windows 4 --gen-tokens 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from token_ids import load_ids


import numpy as np


def window_nll(llm, window: list[int]) -> float:
    """Sum of -log p(window[i+1] | window[:i+1]) over the window, from an empty KV cache."""
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
    mx = logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(logits - mx).sum(axis=1)) + mx[:, 0]
    targets = np.asarray(window[1:])
    return float((logz - logits[np.arange(len(targets)), targets]).sum())


def perplexity(llm, ids: list[int], seq_len: int, max_windows: int | None) -> tuple[float, int, int]:
    n_windows = len(ids) // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}")
    nll = sum(window_nll(llm, ids[w * seq_len:(w + 1) * seq_len]) for w in range(n_windows))
    count = n_windows * (seq_len - 1)
    return math.exp(nll / count), n_windows, count


def decode_speed(llm, prompt: list[int], gen_tokens: int) -> dict:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    generated = []
    for _ in range(gen_tokens):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(tok)
        llm.eval([tok])
    t2 = time.perf_counter()
    return {"prompt_tokens": len(prompt), "prompt_s": t1 - t0, "gen_tokens": gen_tokens, "decode_s": t2 - t1,
            "decode_tokens_per_s": gen_tokens / (t2 - t1) if gen_tokens else None,
            "generated_text": llm.detokenize(generated).decode("utf-8", errors="replace")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", help="path of the .gguf file")
    p.add_argument("--text", nargs="+", help="text file(s), joined with '\\n\\n', tokenized by llama.cpp")
    p.add_argument("--token-ids", help="JSON list of token ids (HF tokenizer) to score instead of --text's tokens")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=65536, help="use only the first N ids (as evaluate_perplexity)")
    p.add_argument("--gen-tokens", type=int, default=0, help="greedy tokens to generate for decode speed (0: skip)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    if not args.text and not args.token_ids:
        p.error("give --text and/or --token-ids")
    if args.seq_len < 2:
        p.error("--seq-len must be at least 2")

    from llama_cpp import Llama, __version__

    n_ctx = max(args.seq_len, args.prompt_tokens + args.gen_tokens)
    t0 = time.perf_counter()
    llm = Llama(model_path=args.gguf, n_ctx=n_ctx, n_batch=min(n_ctx, 2048), n_ubatch=min(n_ctx, 512),
                logits_all=True, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    out = {"reader": "llama.cpp", "llama_cpp_python": __version__, "gguf": os.path.abspath(args.gguf),
           "file_bytes": os.path.getsize(args.gguf), "threads": args.threads, "n_vocab": llm.n_vocab(),
           "load_s": time.perf_counter() - t0}

    llama_ids = None
    if args.text:
        text = "\n\n".join(open(f, encoding="utf-8").read() for f in args.text)
        llama_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        out["llama_tokens"] = len(llama_ids)
    if args.token_ids:
        ids = load_ids(args.token_ids)
        out["tokens_source"] = "token-ids"
        if llama_ids is not None:
            n = min(len(ids), len(llama_ids), args.max_tokens)
            diff = next((i for i in range(n) if ids[i] != llama_ids[i]), None)
            out["llama_tokens_match_ids"] = diff is None
            out["first_token_mismatch"] = diff
    else:
        ids = llama_ids
        out["tokens_source"] = "llama.cpp tokenizer"
    ids = ids[: args.max_tokens]
    bad = [t for t in ids if not 0 <= t < llm.n_vocab()]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the model's vocabulary of {llm.n_vocab()}")

    t1 = time.perf_counter()
    ppl, n_windows, count = perplexity(llm, ids, args.seq_len, args.max_windows)
    out.update(ppl=ppl, seq_len=args.seq_len, windows=n_windows, predicted_tokens=count,
               ppl_s=time.perf_counter() - t1)
    if args.gen_tokens:
        out.update(decode_speed(llm, ids[: args.prompt_tokens], args.gen_tokens))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
