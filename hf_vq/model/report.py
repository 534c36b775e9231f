"""The run report of a quantization (``model.hf_quantizer.last_run``), and its log.

Keys: ``quantized`` {module: {"type", "error"}} (relative output error, the largest over an experts module's
projections; None where the method gives none), ``float`` {module: reason}, ``experts`` {module: routed token counts,
threshold, fallback experts and the rule used}, ``warnings`` (weight-bearing modules left in float by accident:
unsupported or never reached by calibration), ``layers`` (per-Linear error as the runner logged it), times.
"""

from __future__ import annotations

import logging

from torch import nn

from hf_vq.model.targets import UNREACHED

logger = logging.getLogger("hf_vq")


def _accidental(reason: str) -> bool:
    return reason == UNREACHED or reason.startswith("unsupported")


def build_report(model: nn.Module, config, quantized: list[str], floats: dict[str, str], stats,
                 experts: dict[str, dict], member_of: dict[str, str], total_s: float) -> dict:
    errors: dict[str, float] = {}
    for name, err in stats.layers.items():
        owner = member_of.get(name, name)
        errors[owner] = max(err, errors.get(owner, float("-inf")))
    report_q = {n: {"type": getattr(model.get_submodule(n), "layer_type", None), "error": errors.get(n)}
                for n in quantized}
    warnings = []
    accidental = {n: r for n, r in floats.items() if _accidental(r)}
    if accidental:
        warnings.append(f"{len(accidental)} weight-bearing modules were left in float: "
                        + "; ".join(f"{n} ({r})" for n, r in sorted(accidental.items())))
    for name, rep in experts.items():
        if rep.get("fallback"):
            warnings.append(f"{name}: experts {sorted(int(e) for e in rep['fallback'])} received fewer than "
                            f"{rep.get('threshold')} routed calibration tokens; calibrated with "
                            f"{sorted(set(rep['fallback'].values()))}")
    summary = {"method": config.method, "total_s": total_s, "forward_s": stats.forward_s,
               "quantize_s": stats.quantize_s, "resume_io_s": stats.resume_io_s,
               "resumed_blocks": stats.resumed_blocks, "processes": stats.processes, "windows": stats.windows,
               **{k: getattr(stats, k) for k in ("block_iterations", "block_output_mse") if hasattr(stats, k)},
               "layers": stats.layers, "num_layers": len(quantized),
               "quantized": report_q, "float": dict(sorted(floats.items())), "experts": experts,
               "warnings": warnings}
    log_report(summary)
    return summary


def log_report(summary: dict) -> None:
    n_exp = sum(1 for v in summary["quantized"].values() if (v["type"] or "").endswith("_experts"))
    logger.info("hf_vq %s: quantized %d modules (%d fused experts) in %.1fs (forward %.1fs, math %.1fs)",
                summary["method"], summary["num_layers"], n_exp, summary["total_s"], summary["forward_s"],
                summary["quantize_s"])
    by_reason: dict[str, list[str]] = {}
    for name, reason in summary["float"].items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in sorted(by_reason.items()):
        if not _accidental(reason):
            logger.info("hf_vq: kept in float, %s: %s", reason, ", ".join(names))
    for name, rep in summary["experts"].items():
        if "routed_tokens" in rep:
            logger.info("hf_vq: %s (%s calibration): routed tokens per expert %s", name, rep.get("mode"),
                        rep["routed_tokens"])
    for w in summary["warnings"]:
        logger.warning("hf_vq: %s", w)
