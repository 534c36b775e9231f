"""``hf-vq quantize``: quantize a model while it loads and save it.

Each config flag maps to one config field (``FLAGS``). A flag left out takes the value of the ``--config`` file, else
the config class's default, which its help shows (read from the config schemas, so help and configs agree).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from hf_vq.cli.common import use_help_format

HELP = "quantize MODEL while it loads and save the quantized checkpoint to --out"
DEFAULT_METHOD = "gptq"


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


def _int_or_none(value: str):
    return NONE if value.lower() == "none" else int(value)


def _float_or_none(value: str):
    return NONE if value.lower() == "none" else float(value)


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
# flags of the config that are not a plain field value
LIST_FLAGS = {"skip": ("--skip", "modules_to_not_convert"), "override": ("--override", "module_overrides")}


def _configs() -> dict:
    from hf_vq.config import HfVQConfig

    return dict(HfVQConfig._registry)


def _show(value) -> str:
    return "None" if value is None else str(value)


def default_text(field: str) -> str:
    """The field's default per method, from the config schemas: 'default: 4' or 'default: 8 (gptq, gptvq); 1 ...'."""
    by_value: dict[str, list[str]] = {}
    for method, cls in _configs().items():
        if field in cls.schema.fields:
            by_value.setdefault(_show(cls.schema.fields[field].default), []).append(method)
    if len(by_value) == 1:
        return f"default: {next(iter(by_value))}"
    return "default: " + "; ".join(f"{v} ({', '.join(ms)})" for v, ms in by_value.items())


def add_quantize_args(q: argparse.ArgumentParser) -> None:
    """Arguments of ``quantize``; shared by ``hf-vq`` and ``optimum-cli hf-vq`` (hf_vq/optimum_cli.py)."""
    use_help_format(q, HELP)
    q.usage = "%(prog)s MODEL --out DIR [--method METHOD] [--config FILE] [options]"
    methods = sorted(_configs())
    q.add_argument("model", help="model folder or Hub id of a float model")
    q.add_argument("--out", required=True, help="folder the quantized checkpoint and tokenizer are saved to")
    q.add_argument("--method", choices=methods, default=None,
                   help=f"quantization method (default: the --config file's method, else {DEFAULT_METHOD})")
    q.add_argument("--config", metavar="FILE",
                   help="a whole config as JSON or YAML: 'method' and config fields, as a config's to_dict() writes "
                        "them; flags given on the command line override its values (default: none)")
    q.add_argument("--tokenizer", help="tokenizer folder or Hub id, used for calibration and saved with the model "
                                       "(default: the model's own)")
    q.add_argument("--skip", action="append", metavar="MODULE",
                   help="module name or pattern kept in float (repeatable; added to the --config file's "
                        "modules_to_not_convert). The list replaces the default one (the output head and tied "
                        "embeddings): add --skip lm_head to keep the head in float too (default: none)")
    q.add_argument("--override", action="append", type=parse_override, metavar="REGEX:KEY=VALUE[,...]",
                   help="per-layer settings for the layers whose name matches REGEX, e.g. 'down_proj:bits=8,"
                        "group_size=-1' or 'mlp:skip=true'; keys: bits, group_size, sym, skip (gptvq: skip only). "
                        "Repeatable, the last match wins; added to the config file's module_overrides (default: none)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in FLAGS:
        if f.group not in groups:
            groups[f.group] = q.add_argument_group(f.group)
            if f.group == BIG:
                _add_placement_args(groups[f.group])
        help_text = f"{f.help} ({f.shown_default or default_text(f.field)})"
        groups[f.group].add_argument(f.flag, dest=f.dest, default=None, help=help_text, **f.kwargs)
    out = q.add_argument_group("output")
    out.add_argument("--max-shard-size", default="5GB", help="largest safetensors file of the saved checkpoint")
    out.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                     help="also push weights, config, tokenizer and a model card to this Hub repo")


def _add_placement_args(g) -> None:
    g.add_argument("--device-map", type=parse_device_map, default=None,
                   help="where the model's modules live while it is quantized: 'auto', a device such as 'cpu', a "
                        "JSON object {module: device} or a .json file; 'disk' entries are offloaded to "
                        "--offload-folder and onloaded one block at a time (default: none, the whole model in memory)")
    g.add_argument("--max-memory", type=parse_max_memory, default=None, metavar="DEVICE=SIZE[,...]",
                   help="memory per device for --device-map auto, e.g. '0=20GiB,cpu=60GiB'; what does not fit goes "
                        "to disk (default: none, all available memory)")
    g.add_argument("--offload-folder", default=None,
                   help="folder for the modules a device map puts on disk (default: none)")


def read_config_file(path: str) -> dict:
    """The config dict of a JSON or YAML file (safe loaders only)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: {path} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: not valid YAML: {e}") from None
    elif p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--config {path}: not valid JSON: {e}") from None
    else:
        raise ValueError(f"--config {path}: expected a .json, .yaml or .yml file")
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected an object of config fields, got {type(data).__name__}")
    if data.get("layers"):
        raise ValueError(f"--config {path}: 'layers' is written by a finished quantization (it describes a saved "
                         "checkpoint); remove it to quantize with these settings")
    return data


def given_fields(args) -> dict[str, tuple[str, object]]:
    """{config field: (flag, value)} for the config flags given on the command line."""
    given = {f.field: (f.flag, None if getattr(args, f.dest) is NONE else getattr(args, f.dest))
             for f in FLAGS if getattr(args, f.dest, None) is not None}
    if args.skip:
        given["modules_to_not_convert"] = ("--skip", list(args.skip))
    if args.override:
        given["module_overrides"] = ("--override", {k: v for o in args.override for k, v in o.items()})
    return given


def _austen() -> list[str]:
    from hf_vq import assets

    return [assets.austen_calibration_text()]


def build_config(args):
    """The config of a quantize command: the --config file, then the flags given on the command line."""
    from hf_vq.config import ConfigError

    base = read_config_file(args.config) if args.config else {}
    method = args.method or base.get("method") or DEFAULT_METHOD
    configs = _configs()
    if method not in configs:
        raise ConfigError(f"--config {args.config}: unknown method {method!r}; known: {sorted(configs)}",
                          field="method")
    cls = configs[method]
    given = given_fields(args)
    if args.tokenizer and "tokenizer" in cls.schema.fields:
        given.setdefault("tokenizer", ("--tokenizer", args.tokenizer))
    for field, (flag, _) in given.items():
        if field not in cls.schema.fields:
            why = cls.schema.refused.get(field) or f"{cls.__name__} has no field {field!r}"
            raise ConfigError(f"{flag} does not apply to --method {method}: {why}", field=field)
    from hf_vq.config.base import BASE_SCHEMA

    for field in base:  # from_dict only warns about these (old checkpoints wrote them for every method)
        if field in BASE_SCHEMA.fields and field not in cls.schema.fields and field not in cls.derived:
            raise ConfigError(f"--config {args.config}: {cls.__name__} does not take {field!r}: "
                              f"{cls.schema.refused.get(field, '')}".rstrip(": "), field=field)
    merged = {**base, "method": method}
    for field, (_, value) in given.items():
        if field == "modules_to_not_convert":
            value = [*(base.get(field) or []), *value]
        elif field == "module_overrides":
            value = {**(base.get(field) or {}), **value}
        merged[field] = value
    if merged.get("dataset") == "austen":
        merged["dataset"] = _austen()
    cfg = cls.from_dict(merged)
    if cfg.needs_calibration and cfg.dataset is None:
        cfg.dataset = _austen()
    return cfg


def cmd_quantize(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_vq.model.safe_save import save_pretrained_safely

    cfg = build_config(args)
    placement = {}
    if args.device_map is not None:
        placement["device_map"] = args.device_map
    for flag, key in (("--max-memory", "max_memory"), ("--offload-folder", "offload_folder")):
        if getattr(args, key) is not None:
            if args.device_map is None:
                raise ValueError(f"{flag} needs --device-map (e.g. --device-map auto)")
            placement[key] = getattr(args, key)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=cfg, dtype=torch.float32,
                                                 **placement)
    elapsed = time.perf_counter() - t0
    save_pretrained_safely(model, args.out, max_shard_size=args.max_shard_size)   # an earlier --out survives a crash
    tokenizer = args.tokenizer or (cfg.tokenizer if isinstance(getattr(cfg, "tokenizer", None), str) else None)
    tok = AutoTokenizer.from_pretrained(tokenizer or args.model)
    tok.save_pretrained(args.out)
    if args.push_to_hub:
        import hf_vq

        hf_vq.push_quantized(model, args.push_to_hub, tokenizer=tok)
    run = model.hf_quantizer.last_run or {}
    print(json.dumps({"out": str(args.out), "method": cfg.method, "layers": run.get("num_layers"),
                      "resumed_blocks": run.get("resumed_blocks", 0),
                      "load_and_quantize_s": round(elapsed, 1), "forward_s": round(run.get("forward_s", 0.0), 1),
                      "math_s": round(run.get("quantize_s", 0.0), 1)}))
    return 0
