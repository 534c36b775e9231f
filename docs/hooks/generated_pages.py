"""mkdocs hook: fills the config reference and the API reference from the code at build time.

``reference/config.md`` gets one table per config class, read from each class's schema (``hf_vq/config/schema.py``):
every field with its type, allowed values, default, whether it is saved to config.json, and its ``Field.doc``.
``reference/api.md`` gets one mkdocstrings entry per name in ``hf_vq.__all__``. ``architecture.md`` gets the layer
map from pyproject.toml's import-linter contract and the table of registered kernels. None of them can drift from
the code. ``reference/cli.md`` gets the ``--help`` of every ``hf-vq`` command.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

CONFIG_MARK = "<!-- config-reference -->"
API_MARK = "<!-- api-reference -->"
LAYERS_MARK = "<!-- layer-map -->"
KERNELS_MARK = "<!-- kernel-table -->"
CLI_MARK = "<!-- cli-reference -->"
ROOT = Path(__file__).resolve().parents[2]

SAVED = {"always": "yes", "never": "no (runtime only)", "text": "when a string"}


def _type(check) -> str:
    """A short type for one Check (``schema.Optional`` wraps another check)."""
    from hf_vq.config import schema

    if isinstance(check, schema.Optional):
        return f"{_type(check.inner)} or None"
    names = {schema.Bool: "bool", schema.Int: "int", schema.Float: "float", schema.Str: "str",
             schema.StrList: "list[str]", schema.Overrides: "dict", schema.Records: "dict", schema.Instance: "object"}
    for cls in type(check).__mro__:
        if cls in names:
            return names[cls]
    return type(check).__name__


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value) -> str:
    return "`" + repr(value).replace("|", "\\|") + "`"


def config_classes():
    """Every registered config class, in the order a user meets them."""
    import hf_vq  # noqa: F401 - registers the classes
    from hf_vq.config.base import HfVQConfig

    order = ["rtn", "gptq", "gptvq", "adascale", "quantsim"]
    methods = sorted(HfVQConfig._registry, key=lambda m: (order.index(m) if m in order else len(order), m))
    return [HfVQConfig._registry[m] for m in methods]


def render_class(cls) -> str:
    schema = cls.schema
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    lines = [f"## {cls.__name__}", "", f"`method = \"{cls.method}\"`. {doc}", "",
             "| field | type | allowed values | default | saved | meaning |", "|---|---|---|---|---|---|"]
    for name, f in schema.fields.items():
        lines.append(f"| `{name}` | {_type(f.check)} | {_cell(f.check.what)} | {_code(f.default)} | "
                     f"{SAVED[f.saved]} | {_cell(f.doc)} |")
    if cls.derived:
        lines += ["", "Read-only, derived from the fields above and written to config.json: "
                  + ", ".join(f"`{n}`" for n in cls.derived) + "."]
    if schema.refused:
        lines += ["", f"Fields {cls.__name__} refuses (passing one raises `ConfigError` with this hint):", "",
                  "| field | why |", "|---|---|"]
        lines += [f"| `{n}` | {_cell(hint)} |" for n, hint in schema.refused.items()]
    return "\n".join(lines) + "\n"


def render_config_reference() -> str:
    return "\n".join(render_class(cls) for cls in config_classes())


def render_api_reference() -> str:
    import hf_vq

    blocks = []
    for name in hf_vq.__all__:
        blocks.append(f"## `hf_vq.{name}`\n\n::: hf_vq.{name}\n    options:\n      show_root_heading: false\n")
    return "\n".join(blocks)


def layer_contract() -> list[str]:
    """The layers of pyproject.toml's "layers" import-linter contract, top first."""
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = doc["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if c["type"] == "layers")["layers"]


def render_layer_map() -> str:
    lines = ["| layer | packages (each imports only the rows below it) |", "|---|---|"]
    for i, layer in enumerate(layer_contract()):
        names = ", ".join(f"`{name.strip()}`" for name in layer.split("|"))
        lines.append(f"| {i + 1} | {names} |")
    return "\n".join(lines) + "\n"


def render_kernel_table() -> str:
    import hf_vq  # noqa: F401 - importing the package registers every kernel
    from hf_vq.nn import kernel_registry

    lines = ["| storage | kernel | family (`HF_VQ_KERNELS`) | devices | priority under `auto` | input rows | module |",
             "|---|---|---|---|---|---|---|"]
    for storage in sorted(kernel_registry._KERNELS):
        for k in kernel_registry.kernels_for(storage):
            devices = ", ".join(k.devices)
            if k.forced_devices:
                devices += " (" + ", ".join(k.forced_devices) + f" only when `HF_VQ_KERNELS` names `{k.family}`)"
            rows = f"{k.min_rows}-{k.max_rows}" if k.max_rows is not None else f"{k.min_rows} or more"
            lines.append(f"| {storage} | `{k.name}` | `{k.family}` | {devices} | {k.priority} | {rows} | "
                         f"`{k.run.__module__}` |")
    return "\n".join(lines) + "\n"


def render_cli_reference() -> str:
    """``--help`` of every ``hf-vq`` command, as argparse prints it at 100 columns."""
    import argparse
    import os

    from hf_vq.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        blocks = ["## hf-vq\n\n```text\n" + parser.format_help().rstrip() + "\n```\n"]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    sub.prog = f"hf-vq {name}"
                    blocks.append(f"## hf-vq {name}\n\n```text\n" + sub.format_help().rstrip() + "\n```\n")
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(blocks)


RENDERERS = {CONFIG_MARK: render_config_reference, API_MARK: render_api_reference, LAYERS_MARK: render_layer_map,
             KERNELS_MARK: render_kernel_table, CLI_MARK: render_cli_reference}


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - mkdocs hook signature
    for mark, render in RENDERERS.items():
        if mark in markdown:
            markdown = markdown.replace(mark, render())
    return markdown


def section(markdown: str, title: str) -> str:
    """The text of one ``## title`` section of rendered markdown (used by tests/test_docs.py)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, flags=re.S | re.M)
    return match.group(1) if match else ""
