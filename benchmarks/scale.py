"""The scale path on random-init Llama models of growing depth: GPTQ 4-bit g128 quantize-at-load
(``from_pretrained(..., quantization_config=hf_vq.GPTQConfig(...))``) with real calibration text (Austen windows,
SmolLM2 tokenizer), every run in a fresh subprocess so that peak RSS figures do not mix.

1. Peak host RSS and wall time vs number of decoder blocks, in RAM vs every block offloaded to disk (``device_map``
   with ``model.layers.i: "disk"``, embeddings/norm/head on CPU); disk offload once more with a fixed glibc mmap
   threshold (``--mmap-threshold``), which separates allocator retention from what the library keeps.
2. 1 vs 2 processes (torch.distributed gloo, launched with ``torch.distributed.run``), one mid-size depth.
3. Resume overhead: the same run without / with ``resume_dir``, and a run interrupted (KeyboardInterrupt) when the
   middle block starts, then rerun with the same ``resume_dir``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py

(defaults: ``--depths 2,4,8,16 --dist-depth 8 --resume-depth 8 --num-samples 8 --seq-len 128``; 3-4 minutes on
a 2-core machine). Every child runs with OMP_NUM_THREADS=1 and torch.set_num_threads(1), one at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
MIB = 2**20


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, not getrusage's ru_maxrss, which keeps the forking parent's RSS across the
    fork + exec of a subprocess (so every child would report at least the parent's size)."""
    return _status_mib("VmHWM")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------------------- child (one run)


def child(spec: dict) -> None:
    """One measured run. Imports happen first, so ``base_rss_mib`` is the process before any model is touched."""
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    import hf_vq

    base = rss_mib()
    windows = torch.load(spec["windows"])
    cfg = hf_vq.GPTQConfig(bits=4, group_size=128, dataset=windows, num_samples=windows.shape[0],
                           seq_len=windows.shape[1], quantization_device="cpu", resume_dir=spec.get("resume"))
    kw = {}
    if spec.get("offload"):
        depth = json.loads((Path(spec["model"]) / "config.json").read_text())["num_hidden_layers"]
        kw = dict(device_map={"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                              "lm_head": "cpu", **{f"model.layers.{i}": "disk" for i in range(depth)}},
                  offload_folder=spec["offload"])
    if spec.get("interrupt_at") is not None:
        def stop(module, _args):  # what Ctrl-C does when block k starts: blocks 0..k-1 are finished and stored
            if isinstance(module, LlamaDecoderLayer) and module.self_attn.layer_idx == spec["interrupt_at"]:
                raise KeyboardInterrupt
        # a global hook: the model only exists inside from_pretrained, and so does the run to interrupt
        torch.nn.modules.module.register_module_forward_pre_hook(stop)
    t0, cpu0 = time.perf_counter(), cpu_s()
    try:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=cfg, **kw)
        run = model.hf_quantizer.last_run
    except KeyboardInterrupt:
        model, run = None, None
    wall = time.perf_counter() - t0
    cpu = cpu_s() - cpu0
    peak = peak_rss_mib()  # before the digest below reads disk-offloaded codes back into memory

    codes, in_ram = quantized_tensors(model) if model is not None else ({}, 0)
    digest = hashlib.sha256()
    for k in sorted(codes):
        digest.update(k.encode() + codes[k].detach().cpu().contiguous().numpy().tobytes())
    keep = ("total_s", "forward_s", "quantize_s", "resume_io_s", "resumed_blocks", "processes", "windows")
    out = dict(wall_s=wall, peak_rss_mib=peak, base_rss_mib=base, cpu_s=cpu,
               run={k: run[k] for k in keep} if run else None, codes_ram_mib=in_ram / MIB,
               codes_mib=sum(v.numel() * v.element_size() for v in codes.values()) / MIB,
               sha=digest.hexdigest()[:10] if codes else "-")
    rank = int(os.environ.get("RANK", 0))
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["out"]) / f"rank{rank}.json").write_text(json.dumps(out))
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def quantized_tensors(model) -> tuple[dict, int]:
    """Every qweight/scales/qzeros by name, and the bytes of them held in RAM. A quantized module of a disk-offloaded
    block may keep its tensors in the offload folder (meta here): read those through its accelerate hook."""
    codes, in_ram = {}, 0
    for mname, mod in model.named_modules():
        hook = getattr(mod, "_hf_hook", None)
        maps = [h.weights_map for h in getattr(hook, "hooks", [hook]) if getattr(h, "weights_map", None) is not None]
        for tname, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is None or tname not in ("qweight", "scales", "qzeros"):
                continue
            if t.device.type == "meta":
                t = next(m[tname] for m in maps if tname in m)
            else:
                in_ram += t.numel() * t.element_size()
            codes[f"{mname}.{tname}"] = t
    return codes, in_ram


# --------------------------------------------------------------------------------------------- parent


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(spec: dict, nproc: int | None = None, extra_env: dict | None = None) -> tuple[float, list[dict]]:
    """Run ``child(spec)`` in a fresh process (or ``nproc`` ranks under torch.distributed.run); returns the wall time
    seen from here (interpreter start and imports included) and every rank's result."""
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable]
    if nproc is not None:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"]
    cmd += [str(HERE), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env(), **(extra_env or {})}, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"child run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    ranks = sorted(out.glob("rank*.json"))
    return wall, [json.loads(p.read_text()) for p in ranks]


def save_model(directory: Path, depth: int, args) -> float:
    """A random-init Llama (SmolLM2's vocabulary, so the tokenizer's ids fit; tied embeddings like SmolLM2);
    returns its float32 checkpoint size in MiB."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=depth, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=max(512, args.seq_len), tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")) / MIB


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measured run (JSON spec)
    ap.add_argument("--depths", default="2,4,8,16", help="decoder blocks per model (table 1)")
    ap.add_argument("--dist-depth", type=int, default=8, help="depth of the 1 vs 2 process comparison (table 2)")
    ap.add_argument("--resume-depth", type=int, default=8, help="depth of the resume comparison (table 3)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2 tokenizer: ids < 49152")
    ap.add_argument("--num-samples", type=int, default=8, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    ap.add_argument("--mmap-threshold", type=int, default=65536,
                    help="table 1 also runs disk offload with MALLOC_MMAP_THRESHOLD_ set to this (0: not)")
    ap.add_argument("--workdir", default=None, help="default: a temp dir, removed at the end")
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))

    import torch

    torch.set_num_threads(1)
    from hf_vq import assets
    from hf_vq.pipeline.data import build_calibration

    work = Path(args.workdir or tempfile.mkdtemp(prefix="hf_vq_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        # tokenize once here: every run gets the same windows and none pays (or holds in RSS) the tokenizer
        windows = build_calibration([assets.austen_calibration_text()], str(assets.ensure_smollm2()),
                                    num_samples=args.num_samples, seq_len=args.seq_len, seed=0)
        torch.save(windows, work / "windows.pt")
        depths = [int(d) for d in args.depths.split(",")]
        models = {}
        for d in sorted(set(depths) | {args.dist_depth, args.resume_depth}):
            models[d] = (work / f"llama-{d}", save_model(work / f"llama-{d}", d, args))
        base = dict(windows=str(work / "windows.pt"), out=str(work / "out"))
        print(f"random-init Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads "
              f"({args.kv_heads} kv), vocab {args.vocab}, tied embeddings; GPTQ 4-bit g128, {args.num_samples} x "
              f"{args.seq_len} Austen windows (SmolLM2 tokenizer); quantization_device=cpu, 1 thread per process\n")

        # 1. RSS vs depth
        rows = []
        for d in depths:
            path, size = models[d]
            offload = {"offload": str(work / "offload")}
            variants = [("RAM", {}, None), ("disk offload", offload, None)]
            if args.mmap_threshold:
                # glibc raises its mmap threshold after large frees, so later block-sized buffers come from the heap
                # and freed ones are not returned to the OS: a fixed threshold shows what the library itself holds
                variants.append((f"disk offload, MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}", offload,
                                 {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}))
            for label, extra, extra_env in variants:
                shutil.rmtree(work / "offload", ignore_errors=True)
                wall, (r,) = spawn({**base, **extra, "model": str(path)}, extra_env=extra_env)
                rows.append([d, f"{size:.0f}", label, f"{r['peak_rss_mib']:.0f}", f"{r['base_rss_mib']:.0f}",
                             f"{r['peak_rss_mib'] - r['base_rss_mib']:.0f}",
                             f"{r['codes_mib']:.1f} / {r['codes_ram_mib']:.1f}", f"{r['wall_s']:.1f}",
                             f"{r['run']['total_s']:.1f}", f"{wall:.1f}", r["sha"]])
                print(f"  [{d} blocks, {label}: {r['peak_rss_mib']:.0f} MiB, {r['wall_s']:.1f} s]", file=sys.stderr)
        shutil.rmtree(work / "offload", ignore_errors=True)
        print("### 1. Peak host RSS and wall time vs depth (in RAM vs every block on disk)\n")
        print(table(["blocks", "float ckpt MiB", "placement", "peak RSS MiB", "RSS after imports MiB",
                     "peak - imports MiB", "quantized codes MiB (all / in RAM)", "from_pretrained s", "run total_s",
                     "process s", "codes sha"], rows))
        print(f"\nfloat ckpt: the fp32 safetensors file ({args.vocab * args.hidden * 4 / MIB:.0f} MiB of it: the tied "
              "embedding, which stays in RAM and in float). quantized "
              "codes: qweight+scales+qzeros of the result, and how much of that the returned model holds in RAM "
              "(the rest is in the offload folder). RSS after imports: VmRSS before loading; peak: VmHWM. codes sha: "
              "the RAM and disk offload rows of one depth should match.\n")

        # 2. 1 vs 2 processes
        rows = []
        path, _ = models[args.dist_depth]
        for n in (1, 2):
            wall, ranks = spawn({**base, "model": str(path)}, nproc=n)
            slowest = {k: max(r["run"][k] for r in ranks) for k in ("total_s", "forward_s", "quantize_s")}
            rows.append([n, f"{max(r['wall_s'] for r in ranks):.1f}", f"{slowest['total_s']:.1f}",
                         f"{slowest['forward_s']:.1f}", f"{slowest['quantize_s']:.1f}", f"{wall:.1f}",
                         "/".join(str(r["run"]["windows"]) for r in ranks),
                         "/".join(f"{r['cpu_s']:.1f}" for r in ranks),
                         "/".join(f"{r['peak_rss_mib']:.0f}" for r in ranks), "/".join(r["sha"] for r in ranks)])
            print(f"  [{n} process(es): {rows[-1][1]} s]", file=sys.stderr)
        print(f"### 2. torch.distributed (gloo, torch.distributed.run), {args.dist_depth} blocks, in RAM\n")
        print(table(["processes", "from_pretrained s (slowest rank)", "run total_s", "forward_s", "quantize_s",
                     "launcher s", "windows per rank", "CPU s per rank", "peak RSS MiB per rank",
                     "codes sha per rank"], rows))
        print("\nforward_s/quantize_s: the slowest rank's. CPU s: user+sys of each rank during from_pretrained "
              f"(the wall time can only drop where {os.cpu_count()} cores are otherwise idle). Every rank must end "
              "with the same model (one sha per row); 1 vs 2 processes may differ in a few rounding-boundary codes "
              "(Hessian sums in another order).\n")

        # 3. resume
        rows = []
        path, _ = models[args.resume_depth]
        resume = str(work / "resume")
        k = args.resume_depth // 2  # interrupted when block k starts: blocks 0..k-1 are stored
        shutil.rmtree(resume, ignore_errors=True)
        for label, extra in (("no resume_dir", {}), ("resume_dir", {"resume": resume})):
            wall, (r,) = spawn({**base, **extra, "model": str(path)})
            rows.append([label, f"{r['wall_s']:.1f}", f"{r['run']['total_s']:.1f}",
                         f"{r['run']['resume_io_s']:.2f}", r["run"]["resumed_blocks"], r["sha"]])
        wall, (stopped,) = spawn({**base, "model": str(path), "resume": resume, "interrupt_at": k})
        progress = Path(resume) / "progress.json"
        stored = json.loads(progress.read_text())["finished"] + 1 if progress.exists() else 0
        rows.append([f"resume_dir, KeyboardInterrupt when block {k} starts", f"{stopped['wall_s']:.1f}", "-", "-",
                     f"({stored} stored)", "-"])
        wall, (r,) = spawn({**base, "model": str(path), "resume": resume})
        rows.append(["same resume_dir again (resumed)", f"{r['wall_s']:.1f}", f"{r['run']['total_s']:.1f}",
                     f"{r['run']['resume_io_s']:.2f}", r["run"]["resumed_blocks"], r["sha"]])
        rows.append(["interrupted + resumed", f"{stopped['wall_s'] + r['wall_s']:.1f}", "", "", "", ""])
        print(f"### 3. Resume, {args.resume_depth} blocks, in RAM (every row: from_pretrained quantize-at-load)\n")
        print(table(["run", "wall s (load + quantize)", "run total_s", "resume_io_s", "resumed_blocks", "codes sha"],
                     rows))
        print(f"\nresume_dir left after the resumed run: {Path(resume).exists()} (removed once a run completes). "
              "All shas should match (same windows, same config).")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
