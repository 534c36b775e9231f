"""QuantSim quality on SmolLM2-135M-Instruct (Emma calibration, Pride and Prejudice + Persuasion eval).

    python benchmarks/quantsim.py --part ptq            # FP, W8A16 per channel, W4A16 blockwise 64 / LPBQ 64
    python benchmarks/quantsim.py --part qat --steps 120 # QAT from 4-bit blockwise g128 (weight-only) with Trainer

Eval: ppl@512 over the first 16 windows of the test text, fp32 weights/activations (quick protocol, not ppl@2048).
QAT: Trainer, AdamW, only the quantized layers' latents and scales train (embeddings/norms frozen); loss = KL to the
FP model's logits (distillation, so the gain is not domain adaptation to Austen), sequences of --seq-len tokens
sampled from Emma. Writes a loss-curve PNG (--plot). Prints a table; one thread.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

import hf_vq  # noqa: E402
from hf_vq import assets  # noqa: E402
from hf_vq.pipeline.data import sample_windows  # noqa: E402

EVAL = dict(seq_len=512, max_tokens=65536, max_windows=16)


def ppl(model, tok, text):
    t = time.perf_counter()
    with torch.no_grad():
        p = hf_vq.evaluate_perplexity(model, tok, text, **EVAL)
    return p, time.perf_counter() - t


def quantsim(model_dir, tok, calib, **kw):
    kw.setdefault("num_samples", 16)
    kw.setdefault("seq_len", 256)
    cfg = hf_vq.QuantSimConfig(dataset=[calib], tokenizer=tok, **kw)
    t = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=torch.float32)
    return m, time.perf_counter() - t


def part_ptq(model_dir, tok, calib, test, rows):
    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    p, s = ppl(fp, tok, test)
    rows.append(("FP32", p, 0.0, s))
    del fp
    for name, kw in [("W8A16 per-channel min_max", dict(weight_bits=8, weight_granularity="per_channel")),
                     ("W4A16 blockwise 64 min_max", dict(weight_bits=4, weight_granularity="blockwise", block_size=64)),
                     ("W4A16 LPBQ 64 (dbw 8) min_max", dict(weight_bits=4, weight_granularity="lpbq", block_size=64,
                                                            decompressed_bits=8)),
                     ("W4A16 LPBQ 64 tf_enhanced", dict(weight_bits=4, weight_granularity="lpbq", block_size=64,
                                                        quant_scheme="tf_enhanced"))]:
        m, qs = quantsim(model_dir, tok, calib, activation_bits=16, **kw)
        p, s = ppl(m, tok, test)
        rows.append((name, p, qs, s))
        print(rows[-1], flush=True)
        del m


class DistillTrainer(Trainer):
    def __init__(self, *a, teacher=None, scale_lr=None, **kw):
        super().__init__(*a, **kw)
        self.teacher, self.scale_lr = teacher, scale_lr

    def create_optimizer(self, model=None):
        # learnable ranges move on a finer lr than latents (LSQ/EfficientQAT practice)
        if self.optimizer is None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if not n.endswith(".log_scale")], "lr": self.args.learning_rate},
                      {"params": [p for n, p in named if n.endswith(".log_scale")], "lr": self.scale_lr}]
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, weight_decay=0.0)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        with torch.no_grad():
            t_logits = self.teacher(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids, use_cache=False)
        v = out.logits.shape[-1]
        loss = F.kl_div(F.log_softmax(out.logits.float().reshape(-1, v), -1),
                        F.log_softmax(t_logits.float().reshape(-1, v), -1), log_target=True, reduction="batchmean")
        return (loss, out) if return_outputs else loss


def part_qat(model_dir, tok, calib, test, rows, args):
    m, qs = quantsim(model_dir, tok, calib, weight_bits=4, weight_granularity="blockwise", block_size=128,
                     activation_bits=None)
    p0, s = ppl(m, tok, test)
    rows.append(("W4 blockwise g128 (sym RTN, before QAT)", p0, qs, s))
    print(rows[-1], flush=True)
    for n, prm in m.named_parameters():
        prm.requires_grad_(n.endswith(".latent") or n.endswith(".log_scale"))
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(calib, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    windows = sample_windows(ids, args.steps * args.batch, args.seq_len, seed=123)
    train = [{"input_ids": w, "labels": w} for w in windows]
    targs = TrainingArguments(output_dir=args.out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                              learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
                              logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                              dataloader_num_workers=0, seed=0, weight_decay=0.0)
    trainer = DistillTrainer(model=m, args=targs, train_dataset=train, teacher=teacher, scale_lr=args.scale_lr)
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    del teacher
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    p1, s = ppl(m, tok, test)
    rows.append((f"W4 g128 after QAT ({args.steps} st x {args.batch}x{args.seq_len}, lr {args.lr:g}/{args.scale_lr:g})", p1, train_s, s))
    m.save_pretrained(args.out + "/folded")
    again = AutoModelForCausalLM.from_pretrained(args.out + "/folded")
    ids = tok(test[:4000], return_tensors="pt", add_special_tokens=False)["input_ids"][:, :128]
    with torch.no_grad():
        diff = float((again(input_ids=ids).logits - m(input_ids=ids).logits).abs().max())
    print(f"folded + reloaded (QuantSimLinear) vs in-memory QAT model: max |logit diff| {diff:.3g}", flush=True)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([a for a, _ in losses], [b for _, b in losses], marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel("KL(FP || W4 QAT) per token")
        ax.set_title("hf_vq QAT, SmolLM2-135M, W4 blockwise g128")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["ptq", "qat", "all"], default="all")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--scale-lr", type=float, default=1e-3)  # on log(scale): relative steps
    ap.add_argument("--out", default=None, help="trainer/checkpoint folder (default: a fresh temporary folder)")
    ap.add_argument("--plot", default="benchmarks/quantsim_qat_loss.png")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix="hf_vq_qat_bench-")
    model_dir = assets.ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib, test = assets.austen_calibration_text(), assets.austen_test_text()
    rows, losses = [], None
    if args.part in ("ptq", "all"):
        part_ptq(model_dir, tok, calib, test, rows)
    if args.part in ("qat", "all"):
        losses = part_qat(model_dir, tok, calib, test, rows, args)
    print(f"\n{'config':62s} {'ppl@512x16':>10s} {'quant/train s':>13s} {'eval s':>7s}")
    for name, p, qs, s in rows:
        print(f"{name:62s} {p:10.3f} {qs:13.1f} {s:7.1f}")
    if losses:
        print("loss curve:", " ".join(f"{s}:{l:.3f}" for s, l in losses))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "losses": losses}, f, indent=1)


if __name__ == "__main__":
    main()
