"""GGUF for llama.cpp (Llama-family models), with hf_vq's codes mapped onto the legacy block types where the grids
match exactly: symmetric 4-bit -> Q4_0 (d = scale, q = code), asymmetric 4-bit -> Q4_1 (d = scale, m = -zero*scale
rounded to fp16: the report gives that rounding error), symmetric 8-bit -> Q8_0 (q = code - 128). Blocks are 32
columns, so the group size must be a multiple of 32 (or per channel, with in_features a multiple of 32). Everything
else raises, or with ``requantize=True`` is rounded onto the nearest type by the ``gguf`` library's own quantizer.

Metadata, tensor names and the tokenizer come from the ``gguf`` library (``GGUFWriter``, ``get_tensor_name_map``,
``BpeVocab``/``LlamaHfVocab``, ``SpecialVocab``). q_proj/k_proj rows are permuted to llama.cpp's rotary layout
(a row permutation inside each head, applied to codes, scales and zeros alike: still exact).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hf_vq.export.common import ExportError, ExportReport, Layer, copy_tokenizer, write_card

ARCHS = {"llama": "llama", "mistral": "llama"}    # transformers model_type -> llama.cpp architecture
BLOCK = 32
LOAD = """```bash
llama-cli -m model.gguf -p "Hello"          # llama.cpp
```
```python
from llama_cpp import Llama                 # llama-cpp-python
llm = Llama(model_path="model.gguf")
```"""


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ExportError("format='gguf' needs the gguf package (pip install 'hf_vq[export]')") from e
    return gguf


def _permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp's interleaved pairs, per head (convert_hf_to_gguf's ``permute``)."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _block_scales(layer: Layer, values: torch.Tensor) -> torch.Tensor:
    """Per-group values [out, G] -> per-32-block values [out, in/32]."""
    gs = layer.weight.group_size
    per_col = values[:, layer.weight.g_idx.long()] if gs != -1 else values.expand(-1, layer.in_features)
    return per_col[:, ::BLOCK]


def exact_type(layer: Layer) -> str | None:
    """The GGUF type that holds this layer exactly, or the reason it can't (a string starting with 'no:')."""
    w = layer.weight
    if not layer.has_static_groups():
        return "no: g_idx is not i // group_size"
    if layer.in_features % BLOCK:
        return f"no: in_features {layer.in_features} is not a multiple of {BLOCK}"
    if w.group_size != -1 and w.group_size % BLOCK:
        return f"no: group_size {w.group_size} is not a multiple of the {BLOCK}-column GGUF block"
    if w.bits == 4:
        return "Q4_0" if w.sym else "Q4_1"
    if w.bits == 8 and w.sym:
        return "Q8_0"
    return f"no: {w.bits}-bit {'sym' if w.sym else 'asym'} has no exact legacy GGUF type (Q4_0/Q4_1/Q8_0)"


def encode_blocks(layer: Layer, kind: str, perm_heads: int | None) -> tuple[np.ndarray, float]:
    """hf_vq codes -> GGUF block bytes [out, in/32*bytes]; returns (blocks, max |error| vs hf_vq's weight)."""
    w = layer.weight
    codes, scales, zeros = w.codes.cpu(), w.scales.cpu(), w.zeros.cpu()
    if perm_heads:
        codes, scales, zeros = (_permute_rows(t, perm_heads) for t in (codes, scales, zeros))
    out, k = codes.shape
    nb = k // BLOCK
    d = _block_scales(layer, scales).to(torch.float16)                                     # [out, nb]
    q = codes.reshape(out, nb, BLOCK)
    err = 0.0
    if kind == "Q8_0":
        body = (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
        head = d.contiguous().view(torch.uint8).reshape(out, nb, 2)
    else:
        body = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)
        head = d.contiguous().view(torch.uint8).reshape(out, nb, 2)
        if kind == "Q4_1":
            z = _block_scales(layer, zeros.float())
            m_exact = -z * d.float()
            m = m_exact.to(torch.float16)
            err = float((m.float() - m_exact).abs().max()) if m.numel() else 0.0
            head = torch.cat((head, m.contiguous().view(torch.uint8).reshape(out, nb, 2)), -1)
    return torch.cat((head, body), -1).reshape(out, -1).numpy(), err


def _tokenizer(gguf, writer, folder: Path, n_vocab: int, pre: str) -> None:
    for vocab_cls in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
        try:
            vocab = vocab_cls(folder)
            break
        except (FileNotFoundError, TypeError, ValueError, KeyError):
            continue
    else:
        raise ExportError("GGUF export needs the model's tokenizer files (tokenizer.json); pass tokenizer=")
    tokens, scores, types = [], [], []
    for text, score, typ in vocab.all_tokens():
        tokens.append(text if isinstance(text, bytes) else str(text).encode())
        scores.append(score)
        types.append(typ)
    for i in range(len(tokens), n_vocab):      # embedding rows past the tokenizer's vocabulary
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab).add_to_gguf(writer,
                                                                                                       quiet=True)


def write(model, layers: dict[str, Layer], out: Path, report: ExportReport, *, tokenizer, dtype, requantize,
          pre_tokenizer: str = "default", float_linears: str | None = None) -> None:
    """``float_linears``: a GGUF type ("Q4_0", ...) for the float Linear weights inside the decoder blocks, rounded by
    the gguf library's own quantizer (llama.cpp's round-to-nearest baseline); default: written as float."""
    gguf = _gguf()
    cfg = model.config
    arch = ARCHS.get(getattr(cfg, "model_type", None))
    if arch is None:
        raise ExportError(f"GGUF export supports model types {sorted(ARCHS)} (llama.cpp 'llama' architecture); "
                          f"this model is {getattr(cfg, 'model_type', None)!r}")
    n_layers, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    float_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    if not copy_tokenizer(model, tokenizer, out):
        raise ExportError("GGUF export needs the model's tokenizer: pass tokenizer= (none in the model's folder)")

    path = out / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(Path(getattr(model, "name_or_path", "") or "model").name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    if rope.get("rope_type", "default") not in ("default", None):
        raise ExportError(f"rope scaling {rope.get('rope_type')!r} is not written by the GGUF exporter yet")
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    counts: dict[str, int] = {}

    def gguf_name(hf_name: str) -> str:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{hf_name}: no GGUF tensor name for it in the llama architecture")
        return name

    def heads_of(hf_name: str) -> int | None:
        return n_head if hf_name.endswith("q_proj") else n_kv if hf_name.endswith("k_proj") else None

    for name, layer in layers.items():
        if layer.bias is not None:
            raise ExportError(f"{name}: a Linear bias has no place in the llama GGUF architecture")
        kind = exact_type(layer)
        if kind.startswith("no:"):
            if not requantize:
                raise ExportError(f"{name}: {kind[4:]}; pass requantize=True to round it onto a GGUF grid "
                                  "(the report gives the added error)")
            kind = _requantize(gguf, writer, layer, gguf_name(f"{name}.weight"), heads_of(name), report)
        else:
            blocks, m_err = encode_blocks(layer, kind, heads_of(name))
            writer.add_tensor(gguf_name(f"{name}.weight"), blocks, raw_dtype=gguf.GGMLQuantizationType[kind])
            if m_err:
                report.notes.append(f"{name}: Q4_1 offsets rounded to fp16, max abs change {m_err:.3g}")
        counts[kind] = counts.get(kind, 0) + 1

    prefixes = tuple(f"{n}." for n in layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for key, t in model.state_dict().items():
        if key.startswith(prefixes) or (tied and key == "lm_head.weight"):
            continue
        t = t.detach().float().cpu()
        base = key.rsplit(".", 1)[0]
        if heads_of(base):
            t = _permute_rows(t, heads_of(base))
        if float_linears and t.ndim == 2 and key.startswith("model.layers."):
            qtype = gguf.GGMLQuantizationType[float_linears]
            writer.add_tensor(gguf_name(key), gguf.quants.quantize(t.numpy(), qtype), raw_dtype=qtype)
            counts[float_linears] = counts.get(float_linears, 0) + 1
            continue
        as_f32 = t.ndim <= 1 or float_dtype == torch.float32
        writer.add_tensor(gguf_name(key), t.numpy() if as_f32 else t.to(torch.float16).numpy())

    main_kind = max(counts, key=counts.get)
    writer.add_file_type({"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[main_kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(gguf, writer, out, cfg.vocab_size, pre_tokenizer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report.notes.append("GGUF tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    if pre_tokenizer == "default":
        report.notes.append("tokenizer.ggml.pre = 'default': pass the llama.cpp pre-tokenizer name of this model "
                            "(e.g. 'smollm', 'llama-bpe') for exact tokenization of raw text")
    write_card(out, model, "GGUF (llama.cpp)", LOAD, report)


def _requantize(gguf, writer, layer: Layer, name: str, heads: int | None, report: ExportReport) -> str:
    """Round hf_vq's dequantized weight onto the closest GGUF type with the gguf library's quantizer."""
    w = layer.weight
    kind = "Q8_0" if w.bits == 8 else "Q4_0" if w.sym else "Q4_1"
    if layer.in_features % BLOCK:
        raise ExportError(f"{layer.name}: in_features {layer.in_features} is not a multiple of {BLOCK}; "
                          "no GGUF block type fits")
    ref = layer.dequantize()
    if heads:
        ref = _permute_rows(ref, heads)
    qtype = gguf.GGMLQuantizationType[kind]
    blocks = gguf.quants.quantize(ref.numpy(), qtype)
    back = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).reshape(ref.shape).copy())
    report.requantized[layer.name] = float((back - ref).norm() / ref.norm().clamp(min=1e-12))
    writer.add_tensor(name, blocks, raw_dtype=qtype)
    return kind
