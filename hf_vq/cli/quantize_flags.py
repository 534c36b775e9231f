"""The config flags of ``hf-vq quantize``: one flag per config field (``FLAGS``), with the parsers of the flags
whose values are not plain numbers or words (``--override``, ``--device-map``, ``--max-memory``). Each flag's help
shows the field's default, read from the config schemas so that help and configs agree."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


class Flag:
    """One command-line flag that sets the config field ``field``."""

    def __init__(self, group: str, flag: str, field: str, help: str, shown_default: str | None = None, **kwargs):
        self.group, self.flag, self.field, self.help, self.kwargs = group, flag, field, help, kwargs
        self.shown_default = shown_default  # the default in words, where the schema's (None) would not say it

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


class _NoneGiven:
    """'none' given on the command line: the field is set to None (a flag left out is None too, but not set)."""

    def __repr__(self):
        return "None"


NONE = _NoneGiven()


def _or_none(convert, what: str):
    """An argparse type: ``convert(value)``, or NONE for 'none'."""
    def parse(value: str):
        if value.lower() == "none":
            return NONE
        try:
            return convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or 'none', got {value!r}") from None
    return parse


_int_or_none = _or_none(int, "an integer")
_float_or_none = _or_none(float, "a number")


def _bool_word(value: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if value.lower() not in words:
        raise ValueError(value)
    return words[value.lower()]


def parse_override(text: str) -> dict:
    """``REGEX:key=value,...`` -> ``{REGEX: {key: value}}`` (values: integers, or true/false)."""
    pattern, sep, body = text.rpartition(":")
    if not sep or not pattern or not body:
        raise argparse.ArgumentTypeError(f"expected REGEX:key=value[,key=value...] (e.g. 'down_proj:bits=8'), "
                                         f"got {text!r}")
    settings = {}
    for item in body.split(","):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise argparse.ArgumentTypeError(f"{text!r}: expected key=value, got {item!r}")
        try:
            settings[key] = int(value)
        except ValueError:
            try:
                settings[key] = _bool_word(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r}: {key}={value!r} is neither an integer nor "
                                                 "true/false") from None
    try:
        re.compile(pattern)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {pattern!r} is not a valid regex ({e})") from None
    return {pattern: settings}


DEVICE_MAP_WORDS = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"(cpu|disk|meta|mps|[a-z]+(:\d+)?|\d+)")


def parse_candidates(text: str) -> list[dict]:
    """``4:128,3:128,2:64`` (bits:group_size) -> ``[{"bits": 4, "group_size": 128}, ...]``; for GPTVQ,
    ``2d6:32,4d8:256`` (vector_dim d index_bits : rows_per_block) -> ``[{"vector_dim": 2, "index_bits": 6,
    "rows_per_block": 32}, ...]``."""
    out = []
    for item in text.split(","):
        head, sep, tail = item.strip().partition(":")
        dim, vq, index = head.partition("d")
        try:
            if vq:
                out.append({"vector_dim": int(dim), "index_bits": int(index), "rows_per_block": int(tail)})
            else:
                out.append({"bits": int(head), "group_size": int(tail)})
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected BITS:GROUP_SIZE[,...] (e.g. '4:128,3:128,2:64') or, for gptvq, "
                                             f"DIMdINDEX_BITS:ROWS[,...] (e.g. '2d6:32,4d8:256'), got {text!r}") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"expected BITS:GROUP_SIZE or DIMdINDEX_BITS:ROWS, got {item!r} in {text!r}")
    return out


def parse_device_map(text: str):
    """'auto' (and accelerate's other strategies), one device for the whole model, a JSON object
    {module: device} or a .json file holding one."""
    if text in DEVICE_MAP_WORDS or (_DEVICE.fullmatch(text) and not text.endswith(".json")):
        return text
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(DEVICE_MAP_WORDS)}, a device, a JSON object "
                                             f"or a .json file, got {text!r}")
        source = path.read_text(encoding="utf-8")
    try:
        mapping = json.loads(source)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, (str, int)) for v in mapping.values()):
        raise argparse.ArgumentTypeError(f"{text!r}: a device map is a JSON object {{module name: device}}")
    return mapping


def parse_max_memory(text: str) -> dict:
    """'0=20GiB,cpu=60GiB' -> {0: '20GiB', 'cpu': '60GiB'} (GPU indices as integers, as accelerate wants)."""
    out = {}
    for item in text.split(","):
        device, eq, size = (s.strip() for s in item.partition("="))
        if not eq or not device or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", size, re.IGNORECASE):
            raise argparse.ArgumentTypeError(f"expected DEVICE=SIZE[,DEVICE=SIZE...] (e.g. '0=20GiB,cpu=60GiB'), "
                                             f"got {item!r}")
        out[int(device) if device.isdigit() else device] = size
    return out


WEIGHTS, CALIB, BIG, GPTQ, GPTVQ, ADASCALE, QUANTSIM = (
    "weights (all methods)", "calibration (all methods but rtn)", "big models", "gptq", "gptvq", "adascale",
    "quantsim")

BOOL = dict(action=argparse.BooleanOptionalAction)
FLAGS = [
    Flag(WEIGHTS, "--bits", "bits", "bits per weight (rtn, gptq, adascale)", type=int),
    Flag(WEIGHTS, "--group-size", "group_size", "input columns per scale; -1: one scale per output channel "
         "(rtn, gptq, adascale)", type=int),
    Flag(WEIGHTS, "--sym", "sym", "symmetric grid, no zero-point (rtn, gptq, adascale)", **BOOL),
    Flag(WEIGHTS, "--clip-search", "clip_search", "search a per-row range shrink factor (rtn, gptq)", **BOOL),
    Flag(WEIGHTS, "--average-bits", "average_bits", "mixed precision: choose a setting per layer so the mean bits "
         "per weight (scales, zero-points and codebooks counted) stays at or below this budget (gptq, adascale, "
         "gptvq)", type=float),
    Flag(WEIGHTS, "--candidates", "candidates", "settings --average-bits chooses from, as BITS:GROUP_SIZE,... "
         "(gptq, adascale) or DIMdINDEX_BITS:ROWS,... (gptvq: vector_dim, index_bits, rows_per_block)",
         shown_default="default: 2:64,2:128,3:128,4:128; gptvq 4d8:256,2d5:16,2d6:32,2d7:64,2d8:128",
         type=parse_candidates),
    Flag(WEIGHTS, "--lm-head-bits", "lm_head_bits", "quantize the output head to 8 or 4 bits (symmetric); left "
         "out: the head stays in float", type=int, choices=[4, 8]),
    Flag(WEIGHTS, "--lm-head-group-size", "lm_head_group_size", "input columns per scale of a quantized output "
         "head; -1: one per output channel", type=int),
    Flag(WEIGHTS, "--quantize-vision", "quantize_vision", "multimodal models: also quantize the vision tower",
         **BOOL),
    Flag(CALIB, "--dataset", "dataset", "calibration text: 'austen' (the bundled Jane Austen text), a text file or "
         "folder, or a datasets name", shown_default="default: austen"),
    Flag(CALIB, "--dataset-config", "dataset_config", "config name of a datasets dataset"),
    Flag(CALIB, "--dataset-split", "dataset_split", "split of a datasets dataset"),
    Flag(CALIB, "--text-column", "text_column", "text column of a datasets dataset"),
    Flag(CALIB, "--num-samples", "num_samples", "calibration windows", type=int),
    Flag(CALIB, "--seq-len", "seq_len", "tokens per calibration window", type=int),
    Flag(CALIB, "--seed", "seed", "seed of the window sampling and of the methods", type=int),
    Flag(CALIB, "--batch-size", "calibration_batch_size", "calibration windows per forward pass (gptq, gptvq, "
         "quantsim)", type=int),
    Flag(CALIB, "--calibration-dtype", "calibration_dtype", "autocast dtype of the calibration forward passes "
         "(gptq, gptvq)", choices=["float32", "bfloat16"]),
    Flag(CALIB, "--first-token-weight", "first_token_weight", "Hessian weight of each window's first token "
         "(gptq, gptvq, adascale); 'none': seq_len / 32, at least 1", type=_float_or_none),
    Flag(CALIB, "--expert-calibration", "expert_calibration", "MoE experts: Hessians from the tokens routed to "
         "each expert ('routed') or from every calibration token ('all')", choices=["routed", "all"]),
    Flag(CALIB, "--min-expert-tokens", "min_expert_tokens", "MoE experts, routed mode: an expert routed fewer "
         "tokens (a fraction of all calibration tokens if < 1, else a count) is calibrated on all tokens",
         type=float),
    Flag(BIG, "--quantization-device", "quantization_device", "where each decoder block is calibrated and "
         "quantized, one block at a time ('cuda:0', 'cpu', 'auto'); None: where the block is placed"),
    Flag(BIG, "--resume-dir", "resume_dir", "store each finished block there; rerunning the same command "
         "continues after the last stored block (the folder is removed when the run completes)"),
    Flag(GPTQ, "--percdamp", "percdamp", "Hessian damping, a fraction of its mean diagonal (gptq, gptvq, "
         "adascale's GPTQ start)", type=float),
    Flag(GPTQ, "--act-order", "act_order", "quantize columns by decreasing Hessian diagonal", **BOOL),
    Flag(GPTQ, "--true-sequential", "true_sequential", "quantize a block's layer groups in execution order "
         "(gptq, gptvq)", **BOOL),
    Flag(GPTQ, "--block-size", "block_size", "gptq, gptvq: columns per lazy update block; quantsim: weight block "
         "size of the blockwise and lpbq granularities", type=int),
    Flag(GPTVQ, "--vector-dim", "vector_dim", "adjacent input columns quantized together as one vector",
         type=int),
    Flag(GPTVQ, "--index-bits", "index_bits", "bits per vector index (codebooks of 2**index_bits entries)",
         type=int),
    Flag(GPTVQ, "--codebook-bits", "codebook_bits", "storage of codebook entries: 4 or 8 (integers with a "
         "scale) or 16 (fp16)", type=int),
    Flag(GPTVQ, "--rows-per-block", "rows_per_block", "output rows that share one codebook", type=int),
    Flag(GPTVQ, "--cols-per-block", "cols_per_block", "input columns that share one codebook", type=int),
    Flag(GPTVQ, "--kmeans-iterations", "kmeans_iterations", "EM iterations per codebook", type=int),
    Flag(GPTVQ, "--hessian-weighted-lookup", "hessian_weighted_lookup", "pick each vector's centroid by "
         "Hessian-weighted distance", **BOOL),
    Flag(GPTVQ, "--codebook-update", "codebook_update", "refine the codebooks against the Hessian loss after "
         "assignment", **BOOL),
    Flag(GPTVQ, "--codebook-update-steps", "codebook_update_steps", "steps of the codebook update", type=int),
    Flag(GPTVQ, "--data-normalization", "data_normalization", "normalize the weight rows before clustering",
         **BOOL),
    Flag(GPTVQ, "--codebook-scale", "codebook_scale", "'row_block': one scale for the codebooks of a row block "
         "(exports to AIMET); 'codebook': one per codebook", choices=["row_block", "codebook"]),
    Flag(GPTVQ, "--finetune-iterations", "finetune_iterations", "Adam steps of codebook fine-tuning per decoder "
         "block (0: none)", type=int),
    Flag(GPTVQ, "--finetune-lr", "finetune_lr", "learning rate of the codebook fine-tuning", type=float),
    Flag(ADASCALE, "--init", "init", "starting grid: adascale 'rtn' or 'gptq'; gptvq codebook init "
         "'mahalanobis' or 'kpp'", choices=["rtn", "gptq", "mahalanobis", "kpp"]),
    Flag(ADASCALE, "--num-iterations", "num_iterations", "Adam steps per block (at most: see "
         "--early-stop-margin)", type=int),
    Flag(ADASCALE, "--train-batch-size", "batch_size", "calibration sequences per Adam step", type=int),
    Flag(ADASCALE, "--lr-scales", "lr_scales", "learning rate of the scales; 'none': 2e-3 from a GPTQ start, "
         "5e-4 from RTN", type=_float_or_none),
    Flag(ADASCALE, "--lr-clip", "lr_clip", "learning rate of the clipping; 'none': 0 from a GPTQ start, 1e-3 "
         "from RTN", type=_float_or_none),
    Flag(ADASCALE, "--early-stop-margin", "early_stop_margin", "stop a block when a pass over the batches lowers "
         "the loss by less than this fraction; 'none': always run --num-iterations", type=_float_or_none),
    Flag(ADASCALE, "--train-dtype", "train_dtype", "dtype of the training forward/backward; None: bfloat16 "
         "where the device has fast bfloat16", choices=["float32", "bfloat16"]),
    Flag(ADASCALE, "--compile", "compile", "torch.compile the quantizer math; None: only for long runs",
         **BOOL),
    Flag(ADASCALE, "--fp-input-prob", "fp_input_prob", "chance that an element of a block's training input comes "
         "from the float model", type=float),
    Flag(ADASCALE, "--weight-granularity", "weight_granularity", "adascale: group, blockwise or lpbq; quantsim: "
         "per_channel, blockwise or lpbq", choices=["group", "per_channel", "blockwise", "lpbq"]),
    Flag(ADASCALE, "--decompressed-bw", "decompressed_bw", "LPBQ per-channel scale bits", type=int),
    Flag(ADASCALE, "--activation-cache-dir", "activation_cache_dir", "keep the calibration activations on disk "
         "there instead of in memory"),
    Flag(QUANTSIM, "--weight-bits", "weight_bits", "weight bits", type=int),
    Flag(QUANTSIM, "--decompressed-bits", "decompressed_bits", "LPBQ per-channel scale bits", type=int),
    Flag(QUANTSIM, "--activation-bits", "activation_bits", "activation bits (8 or 16); 'none': weights only",
         type=_int_or_none),
    Flag(QUANTSIM, "--activation-dtype", "activation_dtype", "'int': integer activation grids calibrated on data; "
         "'float16'/'bfloat16': cast activations", choices=["int", "float16", "bfloat16"]),
    Flag(QUANTSIM, "--quant-scheme", "quant_scheme", "how activation ranges are found",
         choices=["min_max", "tf_enhanced", "percentile"]),
    Flag(QUANTSIM, "--percentile", "percentile", "percentile of the 'percentile' scheme", type=float),
    Flag(QUANTSIM, "--quantize-inputs", "quantize_inputs", "quantize the inputs of each quantized Linear",
         **BOOL),
    Flag(QUANTSIM, "--quantize-outputs", "quantize_outputs", "quantize the outputs of each quantized Linear",
         **BOOL),
]
def configs() -> dict:
    from hf_vq.config import HfVQConfig

    return dict(HfVQConfig._registry)


def _show(value) -> str:
    return "None" if value is None else str(value)


def default_text(field: str) -> str:
    """The field's default per method, from the config schemas: 'default: 4' or 'default: 8 (gptq, gptvq); 1 ...'."""
    by_value: dict[str, list[str]] = {}
    for method, cls in configs().items():
        if field in cls.schema.fields:
            by_value.setdefault(_show(cls.schema.fields[field].default), []).append(method)
    if len(by_value) == 1:
        return f"default: {next(iter(by_value))}"
    return "default: " + "; ".join(f"{v} ({', '.join(ms)})" for v, ms in by_value.items())
