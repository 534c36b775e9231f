"""Sharing hf_vq models through the Hugging Face Hub: model card, one-commit push, encodings download, checked loader.

transformers 5.x has no hook that fails loudly when a checkpoint's quant_method is not registered: it logs
"Unknown quantization type, got hf_vq", skips the quantization config and leaves every quantized Linear randomly
initialized. So the card states the requirement first, and ``AutoQuantizedModelForCausalLM`` refuses to return a model
that did not load through hf_vq.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
import re
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_session, hf_hub_download, hf_hub_url
from huggingface_hub.utils import build_hf_headers

from hf_vq.model import allocation, convert, targets
from hf_vq.config import QUANT_METHOD, HfVQConfig
from hf_vq.utils.version import __version__
from hf_vq.export.encodings_reader import EncodingsError, parse_document
from hf_vq.utils.io import read_json

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "hf_vq_model_card.md"
SOURCE_TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "model_cards"  # the single source of the templates
SWEEP_PLOT_NAME = "ppl_vs_bits.png"
BITS_PLOT_NAME = "bits_by_depth.png"
LOAD_HINT = ("Install it with `pip install hf_vq` and run `import hf_vq` before `from_pretrained`. Without it, "
             "transformers logs \"Unknown quantization type, got hf_vq\", skips the quantization config and loads "
             "random weights in place of every quantized layer.")
ENCODINGS_SUFFIX = ".encodings"
METHOD_TITLES = {"rtn": "round-to-nearest", "gptq": "GPTQ", "gptvq": "GPTVQ vector quantization"}


# ----------------------------------------------------------------------------- inspection
def _quant_config(model) -> HfVQConfig:
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(cfg, HfVQConfig) or not cfg.layers:
        raise ValueError("model is not an hf_vq-quantized model: load it with a hf_vq config "
                         "(e.g. quantization_config=hf_vq.RTNConfig()) or from an hf_vq checkpoint")
    return cfg


def quantization_summary(model) -> dict[str, Any]:
    """Sizes and bit rates of an hf_vq model, measured from its tensors (what the checkpoint stores)."""
    cfg = _quant_config(model)
    quantized = {n: m for n, m in model.named_modules() if getattr(m, "layer_type", None) in convert.LAYER_TYPES}
    n_linear = len(quantized) + sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    weights = stored_bits = 0
    for m in quantized.values():
        w = m.num_weights() if hasattr(m, "num_weights") else m.in_features * m.out_features  # fused experts: E*(...)
        weights += w
        stored_bits += m.bits_per_value() * w
    seen, total_bytes = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:  # tied weights are stored once
            seen.add(key)
            total_bytes += t.numel() * t.element_size()
    float_params = sum(p.numel() for p in model.parameters()) + weights
    float_dtype = model.dtype
    records = [r for rec in cfg.layers.values() for r in ((rec["gate_up"], rec["down"]) if "gate_up" in rec else (rec,))]
    bits = sorted({b for b in map(_nominal_bits, records) if b is not None})
    label = ("mixed " if len(bits) > 1 else "") + "/".join(f"{b:g}" for b in bits) + "-bit" if bits else "quantized"
    types = sorted({rec.get("type", "?") for rec in cfg.layers.values()})
    return {
        "method": cfg.method,
        "bits": bits,
        "bits_label": label,
        "n_quantized": len(quantized),
        "n_linear": n_linear,
        "layer_types": ", ".join(types),
        "bits_per_weight": stored_bits / max(weights, 1),
        "bits_per_param": total_bytes * 8 / max(float_params, 1),
        "quantized_bytes": total_bytes,
        "float_bytes": float_params * torch.finfo(float_dtype).bits // 8,
        "float_dtype": str(float_dtype).removeprefix("torch."),
    }


def _float_modules(model, cfg: HfVQConfig) -> str:
    """Weight-bearing modules the model keeps in float, by reason (embeddings aside), block indices folded into
    ``*``: routers and unsupported modules show in the card, not only ``modules_to_not_convert``."""
    plan = targets.plan_targets(model, cfg, cfg.modules_to_not_convert or [])
    by_reason: dict[str, list[str]] = {}
    for name, reason in plan.floats.items():
        if reason != targets.EMBEDDING:
            pattern = re.sub(r"\.\d+\.", ".*.", name)
            if pattern not in by_reason.setdefault(reason.split(" (")[0], []):
                by_reason[reason.split(" (")[0]].append(pattern)
    for name in [*plan.linears, *plan.experts]:  # float but quantizable: say so rather than hide it
        by_reason.setdefault("not quantized", []).append(name)
    return "; ".join(f"{', '.join(f'`{n}`' for n in names)} ({reason})" for reason, names in by_reason.items())


def _nominal_bits(rec: dict) -> float | None:
    """Index bits per weight of one layer record: affine ``bits``, or VQ ``index_bits / vector_dim``."""
    if rec.get("bits") is not None:
        return rec["bits"]
    if rec.get("index_bits") is not None and rec.get("vector_dim"):
        return rec["index_bits"] / rec["vector_dim"]
    return None


def _is_repo_id(name: str | None) -> bool:
    return bool(name) and not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/"))


def _inherited_license(model, base_model: str | None) -> str | None:
    """The base model's license: from its config, a local README, or its Hub card (best effort, never fatal)."""
    lic = getattr(model.config, "license", None)
    if lic:
        return lic
    for cand in (base_model, getattr(model.config, "_name_or_path", None)):
        if cand and (Path(cand) / "README.md").is_file():
            lic = ModelCard.load(Path(cand) / "README.md").data.license
            if lic:
                return lic
    if _is_repo_id(base_model) and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        # one plain GET with a short timeout: hf_hub_download would retry for ~30 s when the Hub is unreachable
        try:
            r = get_session().get(hf_hub_url(base_model, "README.md"), headers=build_hf_headers(), timeout=5,
                                  follow_redirects=True)
            if r.status_code == 200:
                return ModelCard(r.text).data.license
            logger.info("no model card for %s (HTTP %s)", base_model, r.status_code)
        except Exception as e:  # no network, malformed card: the card just has no license field
            logger.info("could not read the license of %s: %s", base_model, e)
    return None


# ----------------------------------------------------------------------------- model card
def default_template() -> str:
    """The card template: package data ``hf_vq.model_cards`` of a wheel install, else model_cards/ of the source tree.

    An editable install cannot import ``hf_vq.model_cards`` (setuptools' editable finder does not resolve a data-only
    package mapped from outside hf_vq/), so the source-tree path is the fallback there.
    """
    try:
        res = importlib.resources.files("hf_vq.model_cards").joinpath(TEMPLATE_NAME)
        if res.is_file():
            return res.read_text(encoding="utf-8")
    except ModuleNotFoundError:
        pass
    src = SOURCE_TEMPLATE_DIR / TEMPLATE_NAME
    if not src.is_file():
        raise FileNotFoundError(f"model card template {TEMPLATE_NAME} is neither package data of hf_vq.model_cards "
                                f"nor in {SOURCE_TEMPLATE_DIR}: reinstall hf_vq")
    return src.read_text(encoding="utf-8")


def _check_sweep(sweep, fp_ppl) -> list[tuple[str, float, float]]:
    rows = []
    for i, row in enumerate(sweep or []):
        try:
            label, bpv, ppl = str(row["label"]), float(row["bits_per_value"]), float(row["ppl"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"sweep row {i} needs label, bits_per_value and ppl (numbers): {row!r}") from e
        if not (bpv > 0 and math.isfinite(bpv) and ppl > 0 and math.isfinite(ppl)):
            raise ValueError(f"sweep row {i} ({label}): bits_per_value and ppl must be finite and > 0")
        rows.append((label, bpv, ppl))
    if not rows:
        raise ValueError("sweep is empty: pass a list of {label, bits_per_value, ppl} rows")
    if fp_ppl is not None and not (math.isfinite(fp_ppl) and fp_ppl > 0):
        raise ValueError(f"fp_ppl must be finite and > 0, got {fp_ppl}")
    return rows


def plot_perplexity_vs_bits(sweep: list[dict], fp_ppl: float | None, path: str | os.PathLike) -> Path:
    """PNG of perplexity vs bits per value, one labelled point per ``{label, bits_per_value, ppl}`` row and the float
    model's perplexity as a dashed line. Written atomically (temp file in the same folder + ``os.replace``).

    Needs matplotlib (``pip install "hf_vq[plot]"``); uses the Agg canvas directly, so pyplot's global backend is
    left alone.
    """
    rows = _check_sweep(sweep, fp_ppl)
    fig, ax = _figure((6, 4), "plotting perplexity vs bits per value")
    from matplotlib.ticker import FormatStrFormatter
    ax.scatter([r[1] for r in rows], [r[2] for r in rows], zorder=3)
    for label, bpv, ppl in rows:
        ax.annotate(label, (bpv, ppl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if fp_ppl is not None:
        ax.axhline(fp_ppl, color="gray", linestyle="--", label=f"float: {fp_ppl:.4g}")
        ax.legend(loc="best")
    ppls = [r[2] for r in rows] + ([fp_ppl] if fp_ppl is not None else [])
    if max(ppls) / min(ppls) > 4:
        ax.set_yscale("log")  # 3-bit settings can be several times worse than 4-bit ones
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 30, 40, ... instead of 3x10^1
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.margins(x=0.25, y=0.1)  # room for the point labels
    ax.set_xlabel("bits per value (stored)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(True, alpha=0.3)
    return _save_png(fig, path)


def _figure(size: tuple[float, float], what: str):
    """A matplotlib figure on the Agg canvas (pyplot's global backend is left alone) and its one axes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f'{what} needs matplotlib: pip install "hf_vq[plot]"') from None
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def plot_bits_by_depth(model, path: str | os.PathLike) -> Path:
    """PNG of each quantized layer's stored bits per weight against its block index, one series per layer kind
    (a mixed-precision model's allocation). Written atomically; needs matplotlib (``pip install "hf_vq[plot]"``)."""
    series = allocation.bits_by_depth(model)
    if not series:
        raise ValueError("the model has no quantized layers inside numbered blocks to plot")
    fig, ax = _figure((7, 4), "plotting bits by depth")
    for kind, points in sorted(series.items()):
        ax.plot([d for d, _ in points], [b for _, b in points], marker="o", markersize=3, label=kind.split(".")[-1])
    ax.set_xlabel("block")
    ax.set_ylabel("stored bits per weight")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    return _save_png(fig, path)


def _save_png(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG atomically (temp file in the same folder + ``os.replace``)."""
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def render_model_card(model, base_model: str | None, metrics: dict | None = None, calibration: str | None = None,
                      plot_path=None, *, repo_id: str | None = None, license: str | None = None,
                      template_path: str | os.PathLike | None = None, sweep: list[dict] | None = None,
                      fp_ppl: float | None = None, bits_plot_path=None) -> ModelCard:
    """Model card (README.md) of an hf_vq model: metadata, method and every parameter, bit rates, how to load.

    ``base_model`` should be a Hub id (it goes to the card's ``base_model`` metadata); a local directory is named in the
    text only. ``plot_path`` is referenced by file name: upload the file with the card (``push_quantized`` does).
    ``sweep``: the settings a run measured, ``[{"label", "bits_per_value", "ppl"}, ...]`` (``fp_ppl``: the float
    model's); the card gets their table, and a perplexity-vs-bits PNG is written to ``plot_path`` (put it beside the
    card's README.md; needs matplotlib). A mixed-precision model (``average_bits``) gets a table of the settings
    chosen per layer kind, and with ``bits_plot_path`` a PNG of bits per weight by block (needs matplotlib).
    """
    cfg = _quant_config(model)
    summary = quantization_summary(model)
    if template_path:
        if not Path(template_path).is_file():
            raise FileNotFoundError(f"model card template not found: {template_path}")
        template = Path(template_path).read_text(encoding="utf-8")
    else:
        template = default_template()
    sweep_rows = None
    if sweep is not None:
        if plot_path is None:
            raise ValueError("a sweep needs plot_path: where its PNG is written (beside the card's README.md)")
        sweep_rows = [(label, f"{bpv:.3f}", f"{ppl:.4g}") for label, bpv, ppl in _check_sweep(sweep, fp_ppl)]
        plot_perplexity_vs_bits(sweep, fp_ppl, plot_path)
    base_id = base_model if _is_repo_id(base_model) else None
    base_name = Path(base_model).name if base_model else "a model"
    params = cfg.to_dict()
    params.pop("layers", None)
    mixed = bool(params.pop("allocation", None))
    bits_plot = None
    if mixed and bits_plot_path is not None:
        bits_plot = plot_bits_by_depth(model, bits_plot_path).name
    param_rows = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in sorted(params.items())]
    tags = ["quantized", QUANT_METHOD, f"hf_vq-{cfg.method}", *(f"{b:g}-bit" for b in summary["bits"])]
    pipeline = "text-generation" if type(model).__name__.endswith("ForCausalLM") else None
    card_data = ModelCardData(
        license=license or _inherited_license(model, base_model), base_model=base_id,
        base_model_relation="quantized" if base_id else None, library_name="transformers", tags=tags,
        pipeline_tag=pipeline)
    kept = _float_modules(model, cfg)
    calib = calibration or cfg.describe_calibration() or (
        "None: this method needs no calibration data." if not cfg.needs_calibration else "Not recorded.")
    metric_rows = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in (metrics or {}).items()]
    return ModelCard.from_template(
        card_data, template_str=template,
        title=repo_id.split("/")[-1] if repo_id else f"{base_name} ({summary['bits_label']} hf_vq {cfg.method})",
        repo_id=repo_id or "<repo_id>", base_model=base_id, base_name=base_name, method=cfg.method,
        method_title=METHOD_TITLES.get(cfg.method, cfg.method), hf_vq_version=__version__,
        load_hint=LOAD_HINT, params=param_rows, excluded=kept,
        metrics=metric_rows, calibration=calib, plot_file=Path(plot_path).name if plot_path else None,
        plot_alt="perplexity vs bits per value" if sweep_rows else "evaluation plot", sweep=sweep_rows,
        fp_ppl=f"{fp_ppl:.4g}" if fp_ppl is not None else None, quantized_mb=summary["quantized_bytes"] / 1e6,
        float_mb=summary["float_bytes"] / 1e6,
        allocation=[(k, s, f"{b:.3f}") for k, s, b in allocation.bits_by_type(model)] if mixed else None,
        bits_plot_file=bits_plot,
        **{k: summary[k] for k in ("bits_label", "n_quantized", "n_linear", "layer_types", "bits_per_weight",
                                   "bits_per_param", "float_dtype")})


# ----------------------------------------------------------------------------- push / download
def _read_encodings(path: Path) -> Any:
    """The JSON document of an encodings file, after the same strict, typed checks as ``load_encodings`` (size,
    nesting, UTF-8, duplicates, every field): EncodingsError otherwise."""
    doc = read_json(path, what="JSON encodings file", error=EncodingsError)
    try:
        parse_document(doc)
    except EncodingsError as e:
        raise EncodingsError(f"{path}: {e}") from None
    return doc


def push_quantized(model, repo_id: str, tokenizer=None, card: ModelCard | None = None,
                   encodings_dir: str | os.PathLike | None = None, *, base_model: str | None = None,
                   metrics: dict | None = None, calibration: str | None = None, plot_path=None,
                   extra_files: list | None = None, commit_message: str | None = None, private: bool | None = None,
                   token: str | None = None, revision: str | None = None, max_shard_size: int | str = "5GB",
                   create_pr: bool = False, sweep: list[dict] | None = None, fp_ppl: float | None = None):
    """Push weights + config (+ tokenizer) + model card (+ ``*.encodings`` JSON files) in one commit.

    ``card=None`` renders one with :func:`render_model_card` (``base_model`` defaults to the model's
    ``name_or_path`` when that is a Hub id); with ``sweep`` its perplexity-vs-bits plot (``ppl_vs_bits.png``) is
    drawn beside the README.md and pushed with it. ``plot_path`` instead uploads an image you made. Stale shards and
    encodings from earlier pushes are deleted in the same commit. Returns huggingface_hub's ``CommitInfo``.
    """
    cfg = _quant_config(model)
    if sweep is not None and (card is not None or plot_path is not None):
        raise ValueError("sweep draws the card's plot: pass it without card and plot_path (or render the card "
                         "yourself with render_model_card(..., sweep=..., plot_path=...) and push that plot_path)")
    if base_model is None and _is_repo_id(getattr(model.config, "_name_or_path", None)):
        base_model = model.config._name_or_path
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_vq_push_") as tmp:
        out = Path(tmp)
        model.save_pretrained(out, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        if card is None:
            sweep_plot = out / SWEEP_PLOT_NAME if sweep is not None else None
            card = render_model_card(model, base_model, metrics, calibration, plot_path or sweep_plot,
                                     repo_id=repo_id, sweep=sweep, fp_ppl=fp_ppl,
                                     bits_plot_path=out / BITS_PLOT_NAME if getattr(cfg, "allocation", None) else None)
        card.save(out / "README.md")
        files = [Path(p) for p in (extra_files or [])] + ([Path(plot_path)] if plot_path else [])
        if encodings_dir is not None:
            enc = sorted(Path(encodings_dir).glob(f"*{ENCODINGS_SUFFIX}"))
            if not enc:
                raise ValueError(f"no *{ENCODINGS_SUFFIX} files in {encodings_dir}")
            for p in enc:
                _read_encodings(p)  # only valid JSON goes up
            files += enc
        for p in files:
            if (out / p.name).exists():
                raise ValueError(f"{p.name} would overwrite a file written by save_pretrained")
            shutil.copyfile(p, out / p.name)
        return api.upload_folder(
            repo_id=repo_id, folder_path=out, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"hf_vq {cfg.method} quantized model",
            delete_patterns=["*.safetensors", "model.safetensors.index.json", f"*{ENCODINGS_SUFFIX}"])


def load_encodings_from_hub(repo_id: str, revision: str | None = None, token: str | None = None
                            ) -> dict[str, Any]:
    """Download and parse every ``*.encodings`` file of a repo (JSON only; nothing is unpickled or executed).

    All files come from one commit: ``revision`` is resolved to a sha first.
    """
    info = HfApi(token=token).model_info(repo_id, revision=revision)
    names = sorted(s.rfilename for s in info.siblings or [] if s.rfilename.endswith(ENCODINGS_SUFFIX))
    return {name: _read_encodings(Path(hf_hub_download(repo_id, name, revision=info.sha, token=token)))
            for name in names}


# ----------------------------------------------------------------------------- checked loader
_CONFIG_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "force_download", "proxies")


class AutoQuantizedModelForCausalLM:
    """``AutoModelForCausalLM.from_pretrained`` that guarantees the result was loaded through hf_vq."""

    def __init__(self):
        raise TypeError("use AutoQuantizedModelForCausalLM.from_pretrained(repo_or_path, ...)")

    @classmethod
    def from_pretrained(cls, repo_or_path, **kwargs):
        from hf_vq.integrations.quantizer import HfVQQuantizer
        from transformers import AutoConfig, AutoModelForCausalLM

        if kwargs.get("quantization_config") is None:
            config = kwargs.get("config")
            if config is None or isinstance(config, (str, os.PathLike)):
                config = AutoConfig.from_pretrained(config or repo_or_path,
                                                    **{k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs})
            qc = getattr(config, "quantization_config", None)
            method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
            if method != QUANT_METHOD:
                raise ValueError(
                    f"{repo_or_path} is not an hf_vq checkpoint: its config.json has "
                    + ("no quantization_config" if qc is None else f"quant_method={method!r}")
                    + ". Load it with AutoModelForCausalLM, or quantize it with "
                    "AutoModelForCausalLM.from_pretrained(..., quantization_config=hf_vq.RTNConfig(...)).")
            kwargs["config"] = config
        model = AutoModelForCausalLM.from_pretrained(repo_or_path, **kwargs)
        if not isinstance(getattr(model, "hf_quantizer", None), HfVQQuantizer):
            raise ValueError(f"{repo_or_path} did not load through hf_vq (hf_quantizer is "
                             f"{type(getattr(model, 'hf_quantizer', None)).__name__}); is another quantization "
                             "config overriding it?")
        return model
