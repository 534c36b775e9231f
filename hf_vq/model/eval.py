"""Perplexity over non-overlapping windows (stride = window), as in the GPTQ paper."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_perplexity(model, tokenizer, texts, seq_len: int = 2048, max_tokens: int | None = 65536,
                        batch_size: int = 1, max_windows: int | None = None) -> float:
    """exp(mean NLL) of every predicted token over full windows of ``seq_len`` tokens.

    ``texts``: a string or list of strings (joined with a blank line), or a 1-D tensor of token ids. Only the first
    ``max_tokens`` tokens are used. The model runs in its own dtype; logits are upcast to fp32 for the loss.
    """
    if isinstance(texts, torch.Tensor):
        ids = texts.reshape(-1)
    else:
        text = texts if isinstance(texts, str) else "\n\n".join(texts)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for start in range(0, n_windows, batch_size):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                   reduction="sum")
            nll += float(loss)
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)
