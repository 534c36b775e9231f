"""Mixed precision to a bit budget (``average_bits``): measure each layer's sensitivity, choose a setting per layer.

1. One pass of the float model over the calibration windows, block by block, records each target layer's input
   Hessian twice: H, the one GPTQ quantizes with (each window's first token weighted ``sink_weight()``), and H1,
   the plain average over tokens. For each candidate setting, GPTQ quantizes an evenly strided subset of the
   layer's rows under H, exactly as the real run will (rows are independent given H, so the subset's errors are
   those of the full run), and the output error of each row is scored under H1: d H1 d^T. The first token's
   massive activations get a large weight in H so that GPTQ keeps them well reproduced; scoring under that same
   weight would rate the layers that see them many times too sensitive. H is factored once per layer
   (gptq_factor) and shared by all candidates and by the layers that read the same input.
2. Estimated loss of a candidate: the row errors weighted by the Fisher information of the layer's outputs (the mean
   squared gradient of the model's loss with respect to each output channel, from a few backward passes over
   calibration windows), scaled to all rows ("fisher", the default). "hessian" sums the row errors unweighted;
   "relative" divides them by the layer's output energy W H W^T (benchmarks/mixed.py compares them).
   GPTVQ candidates (hf_vq.pipeline.mixed_vq) are measured the same way, on whole row blocks.
3. hf_vq.algorithms.allocation.choose picks one candidate per unit (a layer, or all layers of one fused experts
   module) with the stored bits of all units at most average_bits x their weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from torch import nn

from hf_vq.algorithms.allocation import choose
from hf_vq.algorithms.gptq import gptq_factor, gptq_quantize
from hf_vq.config import ConfigError
from hf_vq.nn.qlinear import QuantLinear
from hf_vq.pipeline import distributed
from hf_vq.pipeline.blocks import (_run_block, block_prefix, capture_block_inputs, collect_hessians,
                                   find_decoder_blocks, last_target_block)
from hf_vq.pipeline.mixed_vq import vq_candidate_errors, vq_cost
from hf_vq.pipeline.placement import execution_device, move, onloaded, resolve_device
from hf_vq.pipeline.registry import calibration_samples

logger = logging.getLogger(__name__)

ESTIMATORS = ("fisher", "tokenfisher", "hessian", "relative")
DEFAULT_ESTIMATOR = "fisher"
# rows of each layer that GPTQ quantizes per candidate (evenly strided): the estimate's cost stays below a full run's
SENSITIVITY_ROWS = 256
# calibration windows of the backward passes that measure the Fisher weights
FISHER_WINDOWS = 8
FISHER_BATCH = 2


def affine_cost(out_features: int, in_features: int, setting: dict) -> float:
    """Stored bits of a QuantLinear with this setting (codes, scales, zero-points, g_idx): its bits_per_value()."""
    mod = QuantLinear(in_features, out_features, setting["bits"], setting["group_size"], bias=False, device="meta")
    return float(8 * sum(t.numel() * t.element_size() for t in mod.stored_tensors().values()))


def candidate_cost(config, out_features: int, in_features: int, setting: dict) -> float:
    """Stored bits of one layer with this setting, for the config's method."""
    if config.method == "gptvq":
        return vq_cost(config, out_features, in_features, setting)
    return affine_cost(out_features, in_features, setting)


def units_of(targets, experts: list[str]) -> dict[str, list[str]]:
    """Allocation units: each fused experts module (all its projections) is one, every other layer is its own."""
    units: dict[str, list[str]] = {}
    for name in targets:
        owner = next((e for e in experts if name.startswith(e + ".")), name)
        units.setdefault(owner, []).append(name)
    return units


def allocate(model: nn.Module, config, targets: dict[str, nn.Linear], experts: list[str] = (),
             progress: bool = True, estimator: str | None = None) -> dict:
    """Choose a candidate per unit under ``config.average_bits``, store it in ``config.allocation`` and return the
    report: {"estimator", "average_bits", "achieved_bits", "candidates", "units": {unit: {setting,
    bits_per_weight, estimated_loss, candidate_losses (one per candidate)}}, "sensitivity_s", "fisher_s"}."""
    estimator = estimator or DEFAULT_ESTIMATOR
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    cands = config.candidate_list()
    units = units_of(targets, list(experts))
    costs = [[sum(candidate_cost(config, targets[m].out_features, targets[m].in_features, c) for m in members)
              for c in cands] for members in units.values()]
    weights = sum(t.out_features * t.in_features for t in targets.values())
    budget = config.average_bits * weights
    lowest = math.fsum(min(c) for c in costs)
    if lowest > budget:  # known from the shapes alone: refused before any calibration pass
        raise ConfigError(f"average_bits={config.average_bits} is below what the candidates can store for this model: "
                          f"at least {lowest / weights:.4f} bits per weight (the cheapest candidate for every layer)",
                          field="average_bits")
    samples = calibration_samples(model, config)
    t0 = time.perf_counter()
    fisher = None
    token_h = {} if estimator == "tokenfisher" else None
    if estimator in ("fisher", "tokenfisher"):
        fisher = fisher_weights(model, targets, samples[:FISHER_WINDOWS], token_hessians=token_h)
    t1 = time.perf_counter()
    errors = measure(model, config, targets, samples, cands, progress, score_hessians=token_h)
    t2 = time.perf_counter()
    losses = [[sum(estimated_loss(errors[m], fisher, m, estimator, j) for m in members) for j in range(len(cands))]
              for members in units.values()]
    picked = choose(costs, losses, budget)
    config.allocation = {u: dict(cands[j]) for u, j in zip(units, picked.picks)}
    report_units = {}
    for (u, members), j, c, lo in zip(units.items(), picked.picks, costs, losses):
        n_weights = sum(targets[m].out_features * targets[m].in_features for m in members)
        report_units[u] = {**cands[j], "bits_per_weight": c[j] / n_weights, "estimated_loss": lo[j],
                           "candidate_losses": list(lo)}
    achieved = picked.cost / weights
    logger.info("hf_vq: average_bits %.4f chosen (budget %.4f, estimator %s) in %.1fs", achieved,
                config.average_bits, estimator, t2 - t0)
    return {"estimator": estimator, "average_bits": config.average_bits, "achieved_bits": achieved,
            "candidates": [dict(c) for c in cands], "units": report_units, "sensitivity_s": t2 - t1, "fisher_s": t1 - t0}


def estimated_loss(err: dict, fisher: dict | None, name: str, estimator: str, j: int) -> float:
    """Candidate j's estimated loss for one layer. ``err["rows"]``: the measured rows, one tensor for all candidates
    or one per candidate; the subset stands for all rows (and so does ``err["energy"]``, measured on its own rows)."""
    rows_err = err["errors"][j]
    rows = err["rows"][j] if isinstance(err["rows"], list) else err["rows"]
    n = err["out_features"]
    total = float(rows_err.sum()) * n / rows.numel()
    if estimator == "hessian":
        return total
    if estimator == "relative":
        return total / max(float(err["energy"].sum()) * n / err["energy"].numel(), 1e-20)
    return float((rows_err * fisher[name][rows]).sum()) * n / rows.numel()  # fisher, tokenfisher


def subset_rows(n: int, limit: int = SENSITIVITY_ROWS) -> torch.Tensor:
    step = max(1, -(-n // limit))
    return torch.arange(0, n, step)


@torch.no_grad()
def measure(model: nn.Module, config, targets: dict[str, nn.Linear], samples: torch.Tensor, cands: list[dict],
            progress: bool = True, score_hessians: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Per layer: {"rows", "errors" [candidates, rows] (d S d^T of each row), "energy" (w S w^T), "out_features"},
    on the float model (each block's inputs come from the float blocks before it). S: the layer's entry in
    ``score_hessians`` if given, else its plain token-average Hessian H1."""
    from tqdm.auto import tqdm

    prefix, blocks = find_decoder_blocks(model)
    device = resolve_device(config.quantization_device, blocks[0])
    ranks = distributed.current(device)
    samples = distributed.shard(samples, ranks)
    dtype = getattr(torch, getattr(config, "calibration_dtype", "float32"))
    batch_size = getattr(config, "calibration_batch_size", None) or getattr(config, "batch_size", 1)

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    cache = capture_block_inputs(model, blocks[0], samples, batch_size, autocast)
    vq = config.method == "gptvq"
    out: dict[str, dict] = {}
    last = last_target_block(prefix, len(blocks), targets)
    for i in tqdm(range(last + 1), desc="measuring sensitivity", disable=not progress, unit="block"):
        block, bp = blocks[i], block_prefix(prefix, i)
        local = {n[len(bp):]: m for n, m in targets.items() if n.startswith(bp)}
        with onloaded(block, device):
            cache = [(hidden.to(device), move(kw, device)) for hidden, kw in cache]
            outputs: list[torch.Tensor] = []   # the block's outputs from the Hessian pass (weights are unchanged)
            if local:
                plain: dict[str, torch.Tensor] = {}
                hessians = collect_hessians(block, local, cache, autocast, config.sink_weight(), ranks,
                                            token_means=plain, outputs=outputs)
                shared: dict[tuple, list[str]] = {}  # layers reading one input (one H) are solved as one stack
                for n in local:
                    sym = None if vq else config.spec_for(bp + n).sym
                    shared.setdefault((id(hessians[n]), sym), []).append(n)
                for (_, sym), names in shared.items():
                    score = plain[names[0]]
                    if score_hessians is not None:  # a layer the gradient pass never reached keeps H1
                        score = {bp + n: score_hessians[bp + n].to(device) if bp + n in score_hessians
                                 else plain[n] for n in names}
                    weights = {bp + n: local[n].weight.data for n in names}
                    if vq:
                        out.update(vq_candidate_errors(weights, hessians[names[0]], cands, config, score,
                                                       SENSITIVITY_ROWS))
                    else:
                        out.update(candidate_errors(weights, hessians[names[0]], cands, sym, config, score=score))
                del hessians, plain
            if len(outputs) == len(cache):
                cache = [(o, kw) for o, (_, kw) in zip(outputs, cache)]
                continue
            for j, (hidden, kw) in enumerate(cache):
                with autocast():
                    cache[j] = (_run_block(block, hidden, kw).to(hidden.dtype), kw)
    return out


def candidate_errors(weights: dict[str, torch.Tensor], h: torch.Tensor, cands: list[dict], sym: bool,
                     config, score: torch.Tensor | dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Row errors of each candidate for layers sharing the Hessian ``h``: their row subsets, stacked, go through
    GPTQ with ``h`` once per candidate (rows are independent given H), and each row's error d S d^T (and energy
    w S w^T) is taken under ``score`` (S: one matrix, or one per layer; default ``h``)."""
    rows = {n: subset_rows(w.shape[0]) for n, w in weights.items()}
    w = torch.cat([weights[n][rows[n].to(weights[n].device)].float() for n in weights])
    h = h.float()
    score = h if score is None else score
    parts, start = {}, 0
    for n, r in rows.items():
        parts[n] = slice(start, start + r.numel())
        start += r.numel()

    def quadratic(m: torch.Tensor) -> torch.Tensor:  # each row's m S m^T
        if isinstance(score, torch.Tensor):
            return (m @ score.float() * m).sum(1)
        return torch.cat([(m[part] @ score[n].float() * m[part]).sum(1) for n, part in parts.items()])
    act_order = getattr(config, "act_order", True)
    factor = gptq_factor(h, config.percdamp, act_order)  # one factorization serves every candidate
    errors = []
    for c in cands:
        aw = gptq_quantize(w, h, c["bits"], c["group_size"], sym, config.percdamp, act_order,
                           getattr(config, "block_size", 128), getattr(config, "clip_search", False), factor=factor)
        d = w - aw.dequantize()
        errors.append(quadratic(d).double().cpu())
    errors = torch.stack(errors)
    energy = quadratic(w).double().cpu()
    return {n: {"rows": rows[n], "errors": errors[:, part], "energy": energy[part],
                "out_features": weights[n].shape[0]} for n, part in parts.items()}


def fisher_weights(model: nn.Module, targets: dict[str, nn.Linear], samples: torch.Tensor,
                   token_hessians: dict | None = None) -> dict[str, torch.Tensor]:
    """Per target layer, the summed squared gradient of the model's loss (next-token cross-entropy on ``samples``)
    with respect to each output channel: the diagonal Fisher weight of that channel's output error.

    ``token_hessians``: filled with each layer's gradient-weighted input Hessian 2 sum_t a_t x_t x_t^T / sum_t a_t,
    a_t the squared gradient norm of the layer's output at token t. With the channel weights b_i above, the loss
    increase of an output error d x_t is taken as sum_t sum_i a_t b_i (d_i x_t)^2 / sum_t a_t (the per-token,
    per-channel squared gradient factored into a token part and a channel part): tokens whose outputs matter more
    (the attention sink's keys and values, say) weigh more, by measurement rather than by a fixed weight."""
    sums = {n: torch.zeros(lin.out_features, dtype=torch.float64) for n, lin in targets.items()}
    tok_sums = {n: torch.zeros((), dtype=torch.float64) for n in targets} if token_hessians is not None else None
    handles = []

    def watch(name):
        def record(g, x=None):
            g2 = g.detach().double().pow(2)
            sums[name].add_(g2.reshape(-1, g.shape[-1]).sum(0).cpu())
            if x is not None:
                a = g2.sum(-1).reshape(-1, 1).to(torch.float32)  # per token
                xf = x.reshape(-1, x.shape[-1]).to(torch.float32)
                hg = token_hessians.get(name)
                if hg is None:
                    hg = token_hessians[name] = torch.zeros(xf.shape[1], xf.shape[1], device=xf.device)
                hg.addmm_((xf * a).T, xf)
                tok_sums[name].add_(float(a.sum()))

        def hook(_m, args, out):
            if out.requires_grad:
                x = args[0].detach() if tok_sums is not None else None
                out.register_hook(lambda g: record(g, x))
        return hook
    for name, lin in targets.items():
        handles.append(lin.register_forward_hook(watch(name)))
    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_hook(lambda _m, _a, o: o.detach().requires_grad_(True)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    device = execution_device(model)
    ranks = distributed.current(device)
    samples = distributed.shard(samples, ranks)
    try:
        with torch.enable_grad():
            for start in range(0, samples.shape[0], FISHER_BATCH):
                ids = samples[start:start + FISHER_BATCH].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    if ranks.active:
        for s in sums.values():
            s.copy_(distributed.all_reduce(s.to(torch.float32)).double())
    if tok_sums is not None:
        for n, hg in token_hessians.items():
            total = tok_sums[n]
            if ranks.active:
                distributed.all_reduce(hg)
                total = distributed.all_reduce(total.reshape(1).to(torch.float32)).double()[0]
            hg.mul_(2.0 / max(float(total), 1e-30))
    return sums
