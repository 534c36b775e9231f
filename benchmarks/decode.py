"""Side-by-side CPU decode benchmark on SmolLM2-135M: transformers float, hf_vq GPTQ / GPTVQ, torchao int4, llama.cpp.

    python benchmarks/decode.py                                    # every row, --threads 1,2 (tens of minutes)
    python benchmarks/decode.py --rows bf16,gptq4-sym-g32,llamacpp-q4_0 --threads 1 --repeats 1
    python benchmarks/decode.py --small                            # quick smoke run
    python benchmarks/decode.py --out decode.jsonl                 # also write one JSON line per row

Prints one markdown table. Every row runs in its own subprocess (clean RSS and threads: torch.set_num_threads(T),
OMP_NUM_THREADS=T) for each T in --threads:

- decode tok/s: batch 1, greedy ``generate()`` of --new-tokens (end-of-sequence off, so exactly that many) after a
  --prompt-tokens prompt (the start of Pride and Prejudice, HF tokenizer). The prefill is excluded: generate with 1
  new token is timed as well, and decode = (new_tokens - 1) single-token forwards / (t(new_tokens) - t(1)), best of
  --repeats for each. llama.cpp (``llama_reader.decode_speed``): new_tokens single-token ``eval`` calls after the
  prompt / their time, best of --repeats. One short generate (8 tokens) warms up first.
- prefill tok/s: one forward of --prefill-tokens tokens (logits of every position, as llama.cpp's logits_all),
  best of --repeats.
- MB read/token: the weight bytes read per decoded token, from the loaded model: hf_vq modules' ``stored_tensors()``
  (+ bias), float Linear weights (the tied ``lm_head`` counts the whole matrix), one embedding row, every other float
  parameter (norms); torchao tensor subclasses count their inner tensors; llama.cpp: the GGUF tensors (a tied
  ``token_embd`` counts once whole, as output, plus one row).
- % BW: MB read/token * tok/s over the read bandwidth measured at the same thread count (torch.sum over a 1 GiB
  fp32 tensor, best of 3; printed above the table).
- peak RSS (getrusage ru_maxrss of the row's process, load included), load s (from_pretrained; torchao: + quantize_;
  llama.cpp: Llama()), warm-up s (the first generate; ``opt`` rows: hf_vq.optimize + the first generate).

Rows (``--rows``, comma-separated; a base name selects all its dtypes): fp32, bf16 (transformers);
gptq4-{sym,asym}-g{128,32}, gptq4h8-sym-g32 (lm_head_bits=8), gptvq2d and gptvq-mixed3.25 (GPTVQ with
average_bits=3.25) (hf_vq, each loaded as -bf16 and -fp32, each under every ``HF_VQ_KERNELS`` value of --kernels plus an ``opt`` variant calling hf_vq.optimize(model), n/a if hf_vq has none); torchao-int4-g64
(reader venv .cache/readers/torchao: bf16 model, PrototypeInt4WeightOnlyConfig(group_size=64) via quantize_, lm_head
included); llamacpp-q4_0 (reader venv .cache/readers/llama: hf_vq's own GGUF export, Q4_0, of gptq4-sym-g32).

hf_vq models are quantized once (fp32, --calibration windows of Emma) into --cache/<row> with save_pretrained and
reloaded by each timed row (again with --requantize, or when --calibration changes); the GGUF export lives in
--cache/gguf-gptq4-sym-g32. Preparation runs at nice 19.
Under the table: each hf_vq row's decode tok/s over llama.cpp's and torchao's at the same thread count.

The worker modes (``--worker``, ``--prepare``, ``--bandwidth``) are internal; the worker runs in the reader venvs
too, so this file imports only the standard library at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
READERS = Path(os.environ.get("READERS_DIR", ROOT / ".cache" / "readers"))
DEFAULT_CACHE = ROOT / ".cache" / "bench" / "decode"
SMOLLM2 = ROOT / ".cache" / "hf_vq" / "smollm2-135m-instruct"
WARM_TOKENS = 8
GGUF_SOURCE = "gptq4-sym-g32"       # Q4_0 = symmetric 4-bit in blocks of 32

# base row -> (kind, settings). kind: hf (transformers float), hf_vq, torchao, llama
BASES = {
    "fp32": ("hf", {"dtype": "float32"}),
    "bf16": ("hf", {"dtype": "bfloat16"}),
    "gptq4-sym-g128": ("hf_vq", {"method": "gptq", "cfg": dict(bits=4, group_size=128, sym=True)}),
    "gptq4-asym-g128": ("hf_vq", {"method": "gptq", "cfg": dict(bits=4, group_size=128, sym=False)}),
    "gptq4-sym-g32": ("hf_vq", {"method": "gptq", "cfg": dict(bits=4, group_size=32, sym=True)}),
    "gptq4-asym-g32": ("hf_vq", {"method": "gptq", "cfg": dict(bits=4, group_size=32, sym=False)}),
    # the same with the output head quantized (lm_head_bits=8: 8-bit per channel, GPTQ on its input Hessian)
    "gptq4h8-sym-g32": ("hf_vq", {"method": "gptq", "cfg": dict(bits=4, group_size=32, sym=True, lm_head_bits=8)}),
    "gptvq2d": ("hf_vq", {"method": "gptvq",
                          "cfg": dict(vector_dim=2, index_bits=6, rows_per_block=32, cols_per_block=256,
                                     kmeans_iterations=25)}),
    # mixed precision: GPTVQ choosing a setting per layer at 3.25 bits per weight (default candidates)
    "gptvq-mixed3.25": ("hf_vq", {"method": "gptvq", "cfg": dict(average_bits=3.25, kmeans_iterations=25)}),
    "torchao-int4-g64": ("torchao", {"dtype": "bfloat16", "group_size": 64}),
    "llamacpp-q4_0": ("llama", {}),
}
HF_VQ_DTYPES = ("bf16", "fp32")
DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}
SMALL_ROWS = "bf16,gptq4-sym-g32,llamacpp-q4_0"


def log(msg: str) -> None:
    print(f"[decode] {msg}", file=sys.stderr, flush=True)


def reader_python(name: str) -> Path | None:
    """The reader venv's python, or None when setup_readers.sh has not finished building it."""
    py = READERS / name / "bin" / "python"
    return py if py.exists() and (READERS / name / ".ok").exists() else None


# ============================================================================ workers (run in subprocesses)


def tensor_bytes(t) -> int:
    """Bytes of a tensor; tensor subclasses (torchao) count their inner tensors."""
    if hasattr(type(t), "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def bytes_per_token(model) -> tuple[int, dict]:
    """Weight bytes read per decoded token (see the module doc), and their split by kind."""
    from torch import nn

    split = {"quantized": 0, "float_linear": 0, "embedding_row": 0, "other_params": 0}
    seen = set()
    for mod in model.modules():
        own = dict(mod.named_parameters(recurse=False))
        if hasattr(mod, "stored_tensors") and hasattr(mod, "in_features"):      # hf_vq QuantLinear / VQLinear
            split["quantized"] += sum(tensor_bytes(t) for t in mod.stored_tensors().values())
            if getattr(mod, "bias", None) is not None:
                split["quantized"] += tensor_bytes(mod.bias)
        elif isinstance(mod, nn.Linear):
            split["float_linear"] += sum(tensor_bytes(p) for p in own.values())
        elif isinstance(mod, nn.Embedding):
            split["embedding_row"] += tensor_bytes(mod.weight) // mod.num_embeddings
        else:
            for p in own.values():
                if id(p) not in seen:
                    seen.add(id(p))
                    split["other_params"] += tensor_bytes(p)
    return sum(split.values()), split


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def torch_worker(spec: dict) -> dict:
    import torch

    threads = spec["threads"]
    torch.set_num_threads(threads)
    ids = json.loads(Path(spec["ids"]).read_text())
    P, N, L, R = spec["prompt_tokens"], spec["new_tokens"], spec["prefill_tokens"], spec["repeats"]
    kind = spec["kind"]
    out = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "hf_vq_kernels_env": os.environ.get("HF_VQ_KERNELS")}
    if kind == "hf_vq":
        import hf_vq
        if spec.get("opt") and not hasattr(hf_vq, "optimize"):
            return {**out, "na": "n/a (hf_vq has no optimize)"}
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers
    out["transformers"] = transformers.__version__

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=getattr(torch, spec["dtype"]))
    if kind == "torchao":
        import torchao
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_
        quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=spec["group_size"]))
        out["torchao"] = torchao.__version__
        out["weight_types"] = sorted({type(m.weight).__name__ for m in model.modules()
                                      if isinstance(m, torch.nn.Linear)})
    model.eval()
    out["load_s"] = time.perf_counter() - t0

    prompt = torch.tensor([ids[:P]])
    long = torch.tensor([ids[:L]])
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    if isinstance(pad, list):
        pad = pad[0]
    # no end-of-sequence token: every run generates exactly n tokens, as llama.cpp's eval loop does, without the
    # min-length logits processors (two vocabulary-wide ops per token) that min_new_tokens would add
    model.generation_config.eos_token_id = None

    def generate(n):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                              pad_token_id=pad)

    def timed(fn):
        t = time.perf_counter()
        r = fn()
        return time.perf_counter() - t, r

    with torch.no_grad():
        t = time.perf_counter()
        if spec.get("opt"):
            t_opt = time.perf_counter()
            model = hf_vq.optimize(model)
            out["optimize_s"] = time.perf_counter() - t_opt
        generate(WARM_TOKENS)
        out["warmup_s"] = time.perf_counter() - t
        out["bytes_per_token"], out["bytes_split"] = bytes_per_token(model)
        out["prefill_s"] = min(timed(lambda: model(input_ids=long))[0] for _ in range(R))
        t1s, tns = [], []
        for _ in range(R):
            t1s.append(timed(lambda: generate(1))[0])
            tn, seq = timed(lambda: generate(N))
            tns.append(tn)
        gen = seq[0, P:].tolist()
    if len(gen) != N:
        raise RuntimeError(f"generate returned {len(gen)} new tokens, expected {N}")
    dt = min(tns) - min(t1s)
    if dt <= 0:
        raise RuntimeError(f"decode time is not positive: t({N}) {min(tns):.3f} s - t(1) {min(t1s):.3f} s")
    out.update(prefill_tokens=L, prefill_tps=L / out["prefill_s"], generate_1_s=min(t1s), generate_n_s=min(tns),
               decode_s=dt, decode_tps=(N - 1) / dt, generated_ids=gen)
    try:
        out["generated_text"] = AutoTokenizer.from_pretrained(spec["path"]).decode(gen)
    except Exception as e:                                           # noqa: BLE001 (the text is only a sanity aid)
        out["generated_text"] = f"(no tokenizer: {e})"
    out["peak_rss_mib"] = rss_mib()
    return out


def llama_worker(spec: dict) -> dict:
    from gguf import GGUFReader
    from llama_cpp import Llama, __version__
    from llama_reader import decode_speed

    T, ids = spec["threads"], json.loads(Path(spec["ids"]).read_text())
    P, N, L, R = spec["prompt_tokens"], spec["new_tokens"], spec["prefill_tokens"], spec["repeats"]
    n_ctx = max(L, P + N, P + WARM_TOKENS)
    t0 = time.perf_counter()
    # as llama_reader.main: logits of every position (the 512-token prefill computes all of them, like transformers)
    llm = Llama(model_path=spec["path"], n_ctx=n_ctx, n_batch=min(n_ctx, 2048), n_ubatch=min(n_ctx, 512),
                logits_all=True, n_threads=T, n_threads_batch=T, verbose=False)
    out = {"llama_cpp_python": __version__, "load_s": time.perf_counter() - t0}
    t = time.perf_counter()
    decode_speed(llm, ids[:P], WARM_TOKENS)
    out["warmup_s"] = time.perf_counter() - t

    sizes = {tn.name: int(tn.n_bytes) for tn in GGUFReader(spec["path"]).tensors}
    emb = sizes["token_embd.weight"]
    row = emb // llm.n_vocab()
    total = sum(sizes.values()) + row if "output.weight" not in sizes else sum(sizes.values()) - emb + row
    out.update(bytes_per_token=total, file_bytes=os.path.getsize(spec["path"]))

    best = None
    for _ in range(R):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:L])
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    out.update(prefill_tokens=L, prefill_s=best, prefill_tps=L / best)
    runs = [decode_speed(llm, ids[:P], N) for _ in range(R)]
    d = min(runs, key=lambda r: r["decode_s"])
    out.update(decode_s=d["decode_s"], decode_tps=N / d["decode_s"], generated_text=d["generated_text"])
    out["peak_rss_mib"] = rss_mib()
    return out


def bandwidth_worker(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**28, dtype=torch.float32)          # 1 GiB, pages touched
    x.sum()
    best = None
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return {"threads": threads, "bandwidth_gbs": x.nbytes / best / 1e9, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def prepare_worker(what: str, cache: Path, calibration: tuple[int, int]) -> dict:
    """ids: the token ids; <hf_vq base row>: quantize and save; gguf: export GPTQ sym g32 to GGUF. Idempotent."""
    import shutil
    import torch
    import hf_vq
    from hf_vq import assets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache.mkdir(parents=True, exist_ok=True)
    src = assets.ensure_smollm2()
    if what == "ids":
        tok = AutoTokenizer.from_pretrained(src)
        ids = tok(assets.austen_test_text()[:200_000])["input_ids"][:4096]
        (cache / "ids.json").write_text(json.dumps(ids))
        return {"ids": len(ids)}
    if what == "gguf":
        out = cache / f"gguf-{GGUF_SOURCE}"
        model = AutoModelForCausalLM.from_pretrained(cache / GGUF_SOURCE, dtype=torch.float32)
        t = time.perf_counter()
        report = hf_vq.export_checkpoint(model, out, "gguf", gguf_pre_tokenizer="smollm", overwrite=True)
        return {"gguf": str(out / "model.gguf"), "export_s": time.perf_counter() - t,
                "requantized": len(getattr(report, "requantized", []) or [])}
    _, spec = BASES[what]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src)
    common = dict(dataset=[assets.austen_calibration_text()], tokenizer=tok, num_samples=calibration[0],
                  seq_len=calibration[1])
    cfg = (hf_vq.GPTQConfig if spec["method"] == "gptq" else hf_vq.GPTVQConfig)(**spec["cfg"], **common)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=cfg)
    quantize_s = time.perf_counter() - t
    final, tmp = cache / what, cache / f".{what}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    meta = {"row": what, "method": spec["method"], **spec["cfg"], "calibration": list(calibration),
            "quantize_s": quantize_s}
    (tmp / "decode_bench.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return meta


# ============================================================================ driver


def run_json(cmd: list[str], env: dict | None = None, timeout: float | None = None, nice: bool = False) -> dict:
    """Run a worker; its last stdout line is JSON. Failures come back as {"error": ...}."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                              preexec_fn=(lambda: os.nice(19)) if nice else None)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"error": f"exit {proc.returncode}: {tail[-1] if tail else 'no output'}"[:300]}
    return json.loads(lines[-1])


def worker_env(threads: int, kernels: str | None) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(TOKENIZERS_PARALLELISM="false", OMP_DYNAMIC="FALSE", MKL_DYNAMIC="FALSE",
               PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    env.pop("HF_VQ_KERNELS", None)
    if kernels is not None:
        env["HF_VQ_KERNELS"] = kernels
    return env


def expand_rows(selection: list[str], kernels: list[str], opt: bool) -> list[dict]:
    """Row specs in table order: base rows, hf_vq dtypes, kernel variants."""
    picked: dict[str, set] = {}
    for name in selection:
        base, dt = name, None
        if name not in BASES and name.rsplit("-", 1)[0] in BASES and name.rsplit("-", 1)[1] in HF_VQ_DTYPES:
            base, dt = name.rsplit("-", 1)
        if base not in BASES or (dt and BASES[base][0] != "hf_vq"):
            raise SystemExit(f"unknown row {name!r}; rows: {', '.join(BASES)} (hf_vq rows also as <row>-bf16/-fp32)")
        picked.setdefault(base, set()).update([dt] if dt else HF_VQ_DTYPES)
    rows = []
    for base, (kind, spec) in BASES.items():
        if base not in picked:
            continue
        if kind != "hf_vq":
            rows.append({"row": base, "base": base, "kind": kind, "kernels": "-", **spec})
            continue
        for dt in HF_VQ_DTYPES:
            if dt in picked[base]:
                for k in kernels + (["opt"] if opt else []):
                    rows.append({"row": f"{base}-{dt}", "base": base, "kind": kind, "dtype": DTYPE_NAMES[dt],
                                 "kernels": k, "opt": k == "opt"})
    return rows


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", help=f"comma-separated (default: all; --small: {SMALL_ROWS})")
    ap.add_argument("--threads", help="comma-separated thread counts (default 1,2; --small: 1)")
    ap.add_argument("--kernels", help="HF_VQ_KERNELS values for the hf_vq rows (default auto,torch; --small: auto)")
    ap.add_argument("--no-opt", action="store_true", help="skip the hf_vq.optimize rows")
    ap.add_argument("--repeats", type=int, help="best of (default 3; --small: 1)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, help="default 64; --small: 16")
    ap.add_argument("--prefill-tokens", type=int, help="default 512; --small: 128")
    ap.add_argument("--small", action="store_true", help="quick smoke run (fewer rows and tokens, 1 repeat)")
    ap.add_argument("--calibration", default="32x512", help="num_samples x seq_len of Emma windows (hf_vq rows)")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="quantized models and the GGUF export")
    ap.add_argument("--requantize", action="store_true", help="quantize the hf_vq rows (and export the GGUF) again")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    ap.add_argument("--out", help="also write one JSON line per row here")
    # internal worker modes
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    ap.add_argument("--bandwidth", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    calibration = tuple(int(v) for v in args.calibration.split("x"))
    cache = Path(args.cache)

    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(llama_worker(spec) if spec["kind"] == "llama" else torch_worker(spec)))
        return 0
    if args.prepare:
        print(json.dumps(prepare_worker(args.prepare, cache, calibration)))
        return 0
    if args.bandwidth:
        print(json.dumps(bandwidth_worker(args.bandwidth)))
        return 0

    s = args.small
    threads = [int(t) for t in (args.threads or ("1" if s else "1,2")).split(",")]
    kernels = (args.kernels or ("auto" if s else "auto,torch")).split(",")
    repeats = args.repeats or (1 if s else 3)
    new_tokens = args.new_tokens or (16 if s else 64)
    prefill_tokens = args.prefill_tokens or (128 if s else 512)
    rows = expand_rows((args.rows or (SMALL_ROWS if s else ",".join(BASES))).split(","), kernels, not args.no_opt)
    py = sys.executable
    t_start = time.perf_counter()
    load_avg = os.getloadavg()

    # ---- preparation (nice 19): token ids, quantized models, GGUF export, reader venvs, hf_vq.optimize probe
    readers = {"torchao": reader_python("torchao"), "llama": reader_python("llama")}
    na = {}
    for kind, name in (("torchao", "torchao"), ("llama", "llama")):
        if readers[name] is None:
            na[kind] = f"n/a (run benchmarks/setup_readers.sh {name})"
    kinds = {r["kind"] for r in rows}
    needed = sorted({r["base"] for r in rows if r["kind"] == "hf_vq"}, key=list(BASES).index)
    if "llama" in kinds and "llama" not in na and GGUF_SOURCE not in needed:
        needed.append(GGUF_SOURCE)
    prep_fail = {}
    if not (cache / "ids.json").exists():
        r = run_json([py, str(HERE), "--prepare", "ids", "--cache", str(cache)], nice=True)
        if "error" in r:
            raise SystemExit(f"could not write the token ids: {r['error']}")
    for base in needed:
        meta = cache / base / "decode_bench.json"
        if (not args.requantize and meta.exists()
                and json.loads(meta.read_text()).get("calibration") == list(calibration)):
            continue
        log(f"quantizing {base} ({calibration[0]}x{calibration[1]} calibration) -> {cache / base}")
        r = run_json([py, str(HERE), "--prepare", base, "--cache", str(cache), "--calibration", args.calibration],
                     nice=True)
        if "error" in r:
            prep_fail[base] = f"error: quantize {r['error']}"
        else:
            log(f"  {base}: {r['quantize_s']:.0f} s")
    gguf = cache / f"gguf-{GGUF_SOURCE}" / "model.gguf"
    if "llama" in kinds and "llama" not in na:
        src_meta = cache / GGUF_SOURCE / "decode_bench.json"
        if GGUF_SOURCE in prep_fail:
            na["llama"] = prep_fail[GGUF_SOURCE]
        elif args.requantize or not gguf.exists() or gguf.stat().st_mtime < src_meta.stat().st_mtime:
            log(f"exporting {GGUF_SOURCE} to GGUF -> {gguf}")
            r = run_json([py, str(HERE), "--prepare", "gguf", "--cache", str(cache)], nice=True)
            if "error" in r:
                na["llama"] = f"error: GGUF export {r['error']}"
    has_optimize = True
    if any(r.get("opt") for r in rows):
        probe = subprocess.run([py, "-c", "import hf_vq; print(hasattr(hf_vq, 'optimize'))"],
                               capture_output=True, text=True)
        has_optimize = probe.stdout.strip().endswith("True")

    # ---- read bandwidth per thread count
    bw = {}
    for t in threads:
        bw[t] = run_json([py, str(HERE), "--bandwidth", str(t)], env=worker_env(t, None))
    ids_file = str(cache / "ids.json")

    # ---- timed rows, each in its own process
    results = []
    for t in threads:
        for row in rows:
            res = {"row": row["row"], "kernels": row["kernels"], "threads": t}
            kind = row["kind"]
            reason = na.get(kind) or prep_fail.get(row["base"])
            if row.get("opt") and not has_optimize:
                reason = "n/a (hf_vq has no optimize)"
            if reason:
                results.append({**res, "na": reason})
                log(f"{row['row']} [{row['kernels']}] T={t}: {reason}")
                continue
            spec = {"kind": kind, "threads": t, "ids": ids_file, "prompt_tokens": args.prompt_tokens,
                    "new_tokens": new_tokens, "prefill_tokens": prefill_tokens, "repeats": repeats}
            if kind == "hf":
                spec.update(path=str(SMOLLM2), dtype=row["dtype"])
                exe, env = py, worker_env(t, None)
            elif kind == "hf_vq":
                spec.update(path=str(cache / row["base"]), dtype=row["dtype"], opt=row["opt"])
                exe, env = py, worker_env(t, None if row["opt"] else row["kernels"])
            elif kind == "torchao":
                spec.update(path=str(SMOLLM2), dtype=row["dtype"], group_size=row["group_size"])
                exe, env = str(readers["torchao"]), worker_env(t, None)
            else:
                spec.update(path=str(gguf))
                exe, env = str(readers["llama"]), worker_env(t, None)
            t0, load_before = time.perf_counter(), os.getloadavg()[0]
            r = run_json([exe, str(HERE), "--worker", json.dumps(spec)], env=env, timeout=args.timeout)
            res.update(r, row_wall_s=time.perf_counter() - t0, load_avg=max(load_before, os.getloadavg()[0]))
            gbs = bw[t].get("bandwidth_gbs")
            if "decode_tps" in res and gbs:
                res["read_gbs"] = res["bytes_per_token"] * res["decode_tps"] / 1e9
                res["pct_bandwidth"] = 100 * res["read_gbs"] / gbs
            results.append(res)
            shown = res.get("decode_tps") and f"{res['decode_tps']:.1f} tok/s"
            log(f"{row['row']} [{row['kernels']}] T={t}: {shown or res.get('na') or res.get('error')} "
                f"({res['row_wall_s']:.0f} s)")

    # ---- table
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    b0 = next(iter(bw.values()))
    print(f"SmolLM2-135M-Instruct, batch 1, greedy generate(): {new_tokens} new tokens after a {args.prompt_tokens}-token "
          f"prompt (prefill excluded), prefill = one forward of {prefill_tokens} tokens, best of {repeats}. "
          f"{cpu}, {os.cpu_count()} CPUs, torch {b0.get('torch', '?')} ({b0.get('cpu_capability', '?')}), "
          f"load average at start {load_avg[0]:.1f}.")
    print("Read bandwidth (torch.sum over 1 GiB fp32, best of 3): " + "; ".join(
        f"{t} thread{'s' if t > 1 else ''} {fmt(bw[t].get('bandwidth_gbs'))} GB/s" if "bandwidth_gbs" in bw[t]
        else f"{t}: {bw[t].get('error')}" for t in threads) + ".")
    print()
    print("| row | kernels | threads | decode tok/s | prefill tok/s | MB read/token | % of read BW | peak RSS MiB "
          "| load s | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "decode_tps" not in r:
            print(f"| {r['row']} | {r['kernels']} | {r['threads']} | {r.get('na') or 'error: ' + str(r.get('error'))}"
                  " | - | - | - | - | - | - |")
            continue
        print(f"| {r['row']} | {r['kernels']} | {r['threads']} | {r['decode_tps']:.1f} | {r['prefill_tps']:.0f} | "
              f"{r['bytes_per_token'] / 1e6:.1f} | {fmt(r.get('pct_bandwidth'), '.0f')} | {r['peak_rss_mib']:.0f} | "
              f"{r['load_s']:.1f} | {r['warmup_s']:.1f} |")
    ref = {(r["row"], r["threads"]): r.get("decode_tps") for r in results if r["row"] in
           ("llamacpp-q4_0", "torchao-int4-g64")}
    lines = []
    for r in results:
        if not (r["row"].startswith(("gptq", "gptvq")) and r.get("decode_tps")):
            continue
        parts = []
        for name, label in (("llamacpp-q4_0", "llama.cpp"), ("torchao-int4-g64", "torchao")):
            base = ref.get((name, r["threads"]))
            parts.append(f"{r['decode_tps'] / base:.2f}x {label}" if base else f"- {label}")
            r[f"vs_{label}"] = r["decode_tps"] / base if base else None
        lines.append(f"- {r['row']} [{r['kernels']}], {r['threads']} thr: {', '.join(parts)}")
    loads = [r["load_avg"] for r in results if "load_avg" in r]
    if loads:
        print()
        print(f"1-minute load average around the rows: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs "
              "(above cores minus threads, the rows compete with other processes: OpenMP threads then stall).")
    if lines:
        print()
        print("hf_vq decode tok/s over llama.cpp's and torchao's at the same thread count:")
        print("\n".join(lines))
    log(f"total {time.perf_counter() - t_start:.0f} s")

    if args.out:
        settings = {"prompt_tokens": args.prompt_tokens, "new_tokens": new_tokens, "prefill_tokens": prefill_tokens,
                    "repeats": repeats, "calibration": args.calibration, "cpu": cpu, "platform": platform.platform(),
                    "load_avg_start": load_avg[0]}
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps({**r, "bandwidth_gbs": bw[r["threads"]].get("bandwidth_gbs"), **settings}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
