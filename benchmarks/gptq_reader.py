"""GPTQ checkpoints through GPTQModel + transformers on CPU, printed as one JSON line.

Runs inside the reader venv built by ``benchmarks/setup_readers.sh gptq`` (``.cache/readers/gptq``: torch 2.13.0+cpu,
gptqmodel 7.6.0, transformers 5.24.0, optimum 2.3.0); it does not import hf_vq.

    make-ref OUT [--bits 4 --group-size 32 --asym]
        Quantizes a tiny random Llama with GPTQModel itself and saves it: a real GPTQ checkpoint written by a
        reader, for layout tests of hf_vq's exporter (.cache/readers/gptq_ref/ by default in setup_readers.sh).
    load DIR [--token-ids ids.json --seq-len 512 --max-windows 4] [--logits-out logits.npy]
        ``AutoModelForCausalLM.from_pretrained(DIR)`` (quant_method "gptq" -> transformers' GptqHfQuantizer ->
        gptqmodel's CPU kernel), then greedy text from --prompt, logits of --token-ids' first window and, with
        --max-windows, perplexity over non-overlapping windows exactly as ``hf_vq.evaluate_perplexity``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from token_ids import load_ids

# GPTQModel 7.6.0 sizes its CPU pool as (cores+1)//2 but asks 2 workers for its model loader: on 2 cores that
# raises "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1".
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

WORDS = ("the a of to and in is was it that he she they we you not but with for on at as by from this "
         "had have be been were are his her their its my our your one two three said would could should").split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, "[PAD]": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]")


def make_ref(args) -> dict:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=256, bos_token_id=None, eos_token_id=1, pad_token_id=2)
    float_dir = args.out.rstrip("/") + "_float"
    LlamaForCausalLM(cfg).save_pretrained(float_dir)
    tok.save_pretrained(float_dir)
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)}
             for ids in torch.randint(3, len(tok), (32, 64), generator=g).tolist()]
    qc = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, desc_act=False)
    model = GPTQModel.load(float_dir, qc, device="cpu")
    t0 = time.perf_counter()
    model.quantize(calib, batch_size=1)
    model.save(args.out)
    return {"made": os.path.abspath(args.out), "float_model": os.path.abspath(float_dir), "bits": args.bits,
            "group_size": args.group_size, "sym": not args.asym, "quantize_s": time.perf_counter() - t0,
            "files": sorted(os.listdir(args.out))}


def load(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.dir, device_map="cpu")
    model.eval()
    out = {"reader": "transformers+gptqmodel", "dir": os.path.abspath(args.dir), "load_s": time.perf_counter() - t0,
           "dtype": str(model.dtype),
           "quant_linear": sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})}
    if not out["quant_linear"]:
        raise RuntimeError("no module with a qweight in the loaded model: the checkpoint was not read as GPTQ")
    tok = AutoTokenizer.from_pretrained(args.dir)
    with torch.no_grad():
        enc = tok(args.prompt, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=args.gen_tokens, do_sample=False)
        out["generated_text"] = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        if args.token_ids:
            ids = torch.tensor(load_ids(args.token_ids)[: args.max_tokens])
            n_windows = ids.numel() // args.seq_len
            if args.max_windows is not None:
                n_windows = min(n_windows, args.max_windows)
            if n_windows == 0:
                raise ValueError(f"{args.token_ids}: fewer than one window of {args.seq_len} tokens")
            windows = ids[: n_windows * args.seq_len].view(n_windows, args.seq_len)
            nll = 0.0
            for w in windows:
                logits = model(input_ids=w[None], use_cache=False).logits.float()
                if args.logits_out and "logits_shape" not in out:
                    import numpy as np
                    np.save(args.logits_out, logits[0].numpy())
                    out["logits_shape"] = list(logits.shape)
                nll += float(F.cross_entropy(logits[0, :-1], w[1:], reduction="sum"))
            out.update(ppl=math.exp(nll / (n_windows * (args.seq_len - 1))), seq_len=args.seq_len,
                       windows=n_windows)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-ref")
    m.add_argument("out")
    m.add_argument("--bits", type=int, default=4)
    m.add_argument("--group-size", type=int, default=32)
    m.add_argument("--asym", action="store_true")
    ld = sub.add_parser("load")
    ld.add_argument("dir")
    ld.add_argument("--prompt", default="the one of")
    ld.add_argument("--gen-tokens", type=int, default=8)
    ld.add_argument("--token-ids", help="JSON list of token ids to score")
    ld.add_argument("--seq-len", type=int, default=512)
    ld.add_argument("--max-windows", type=int, default=None)
    ld.add_argument("--max-tokens", type=int, default=65536)
    ld.add_argument("--logits-out", help="save the first window's logits [1, seq_len, vocab] as .npy")
    args = p.parse_args(argv)
    out = make_ref(args) if args.cmd == "make-ref" else load(args)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
