"""``hf-vq quantize``: quantize a model while it loads and save it.

Each config flag sets one config field (hf_vq/cli/quantize_flags.py). A flag left out takes the value of the
``--config`` file, else the config class's default, which its help shows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hf_vq.cli.common import use_help_format
from hf_vq.cli.quantize_flags import (BIG, FLAGS, NONE, configs, default_text, parse_device_map, parse_max_memory,
                                      parse_override)

HELP = "quantize MODEL while it loads and save the quantized checkpoint to --out"
DEFAULT_METHOD = "gptq"


def add_quantize_args(q: argparse.ArgumentParser) -> None:
    """Arguments of ``quantize``; shared by ``hf-vq`` and ``optimum-cli hf-vq`` (hf_vq/optimum_cli.py)."""
    use_help_format(q, HELP)
    q.usage = "%(prog)s MODEL --out DIR [--method METHOD] [--config FILE] [options]"
    methods = sorted(configs())
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
    from hf_vq.config.base import BASE_SCHEMA

    base = read_config_file(args.config) if args.config else {}
    method = args.method or base.get("method") or DEFAULT_METHOD
    by_method = configs()
    if method not in by_method:
        raise ConfigError(f"--config {args.config}: unknown method {method!r}; known: {sorted(by_method)}",
                          field="method")
    cls = by_method[method]
    given = given_fields(args)
    if args.tokenizer and "tokenizer" in cls.schema.fields:
        given.setdefault("tokenizer", ("--tokenizer", args.tokenizer))
    for field, (flag, _) in given.items():
        if field not in cls.schema.fields:
            why = cls.schema.refused.get(field) or f"{cls.__name__} has no field {field!r}"
            raise ConfigError(f"{flag} does not apply to --method {method}: {why}", field=field)
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
