"""The fast paths: the book's GPTModel run faster with the same results: a fused forward
pass with a key/value cache, batched generation, the loss only where targets count, and
oneDNN's kernel for generation's small products. Used by notebooks 05, 07 and 10.
"""

from __future__ import annotations

import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

import helpers

# names notebooks, course modules and the tests use from here (course.speed)
from course.training_setup import (  # noqa: F401
    PRECISIONS,
    autocast_context,
    choose_precision,
    keep_freed_memory,
    make_optimizer,
)


class KVCache:
    """Keys and values of every transformer block for the tokens processed so far.

    During generation the keys and values of earlier tokens never change, so they are
    computed once and kept here; each step then feeds only the newest token. Space for
    `max_len` tokens is reserved on first use (in the dtype the model computes in), so
    each step writes in place instead of copying the whole cache.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0  # tokens stored so far; GPTModel.forward advances it
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Store the new tokens' (batch, heads, tokens, head_dim) keys and values of
        block `layer`; return the keys and values of all tokens so far."""
        start, end = self.length, self.length + keys.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"This KVCache holds {self.max_len} tokens, {end} were fed: make it larger."
            )
        if self.keys[layer] is None:
            b, h, _, d = keys.shape
            self.keys[layer] = keys.new_empty(b, h, self.max_len, d)
            self.values[layer] = values.new_empty(b, h, self.max_len, d)
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (indices), for example when the others have finished."""
        self.keys = [None if k is None else k[rows] for k in self.keys]
        self.values = [None if v is None else v[rows] for v in self.values]


def _require_gpt_model(model: nn.Module, function: str) -> None:
    if not isinstance(model, helpers.GPTModel):
        raise TypeError(
            f"{function} needs a helpers.GPTModel, got a {type(model).__name__}. "
            "Use helpers.generate for other models."
        )


FEW_ROWS = 32  # up to this many rows, `linear` uses oneDNN's kernel (x86-64 CPUs)
_onednn_linear: bool | None = None  # whether this PyTorch has it (checked on first use)


def _onednn_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """x @ weight.T + bias with oneDNN's linear kernel (no gradient)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _has_onednn_linear() -> bool:
    """Whether PyTorch's oneDNN linear kernel runs here and gives F.linear's result.

    Only on x86-64 CPUs, where it was measured (benchmarks/README.md); ARM CPUs (Apple
    silicon, for example) keep PyTorch's default path.
    """
    global _onednn_linear
    if _onednn_linear is None and platform.machine().lower() not in ("x86_64", "amd64"):
        _onednn_linear = False
    if _onednn_linear is None:
        try:
            own = torch.Generator().manual_seed(0)  # (the global generator stays untouched)
            x, w, b = (torch.randn(*shape, generator=own) for shape in ((3, 16), (5, 16), (5,)))
            y = _onednn_kernel(x, w, b)
            _onednn_linear = bool(torch.allclose(y, F.linear(x, w, b), atol=1e-5))
        except (AttributeError, NotImplementedError, RuntimeError, TypeError):
            _onednn_linear = False  # an older PyTorch, or a build without oneDNN
    return _onednn_linear


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, the same products; for a few rows on an x86-64 CPU, a faster kernel.

    A generation step multiplies one new token per prompt by every weight matrix:
    few rows, large matrices. PyTorch's default matrix library (MKL) is slow for that
    shape on some CPUs; oneDNN's linear kernel (also part of PyTorch) reads each weight
    matrix once for all the rows (benchmarks/README.md, row "batched, no oneDNN").
    Used only for a plain fp32 nn.Linear, without gradients or autocast; everything
    else (training, LoRA layers, GPUs, ARM CPUs) calls `layer(x)`.
    """
    if (
        type(layer) is nn.Linear
        and x.device.type == "cpu"
        and x.dtype == layer.weight.dtype == torch.float32
        and x.numel() <= FEW_ROWS * x.shape[-1]
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and _has_onednn_linear()
    ):
        return _onednn_kernel(x, layer.weight, layer.bias)
    return layer(x)


def _layer_norm(norm: helpers.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """The book's LayerNorm with PyTorch's fused kernel: the same formula in one pass."""
    return F.layer_norm(x, norm.scale.shape, norm.scale, norm.shift, norm.eps)


def _attention(att, x, cache, layer, attn_mask):
    """The book's MultiHeadAttention with PyTorch's fused scaled_dot_product_attention.

    With a `cache`, `x` holds only the new tokens, which attend to the cached ones too.
    `attn_mask` (bool, True where a query may look at a key, shaped (batch, 1, new
    tokens, all tokens)) replaces the causal mask.
    """
    b, num_tokens, _ = x.shape
    # (b, tokens, d_out) -> (b, heads, tokens, head_dim)
    shape = (b, num_tokens, att.num_heads, att.head_dim)
    queries = linear(att.W_query, x).view(shape).transpose(1, 2)
    keys = linear(att.W_key, x).view(shape).transpose(1, 2)
    values = linear(att.W_value, x).view(shape).transpose(1, 2)
    start = 0  # position of the first new token
    if cache is not None:
        start = cache.length
        keys, values = cache.update(layer, keys, values)
    dropout_p = att.dropout.p if att.training else 0.0
    if attn_mask is None and start == 0:  # plain causal attention
        context = F.scaled_dot_product_attention(
            queries, keys, values, dropout_p=dropout_p, is_causal=num_tokens > 1
        )
    else:
        if attn_mask is None and num_tokens > 1:  # new tokens after cached ones
            attn_mask = att.mask[start : start + num_tokens, : start + num_tokens] == 0
        # (one new token after cached ones may look at every key: no mask needed)
        context = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=attn_mask, dropout_p=dropout_p
        )
    context = context.transpose(1, 2).reshape(b, num_tokens, att.d_out)
    return linear(att.out_proj, context)


def forward(
    model: helpers.GPTModel,
    in_idx: torch.Tensor,
    cache: KVCache | None = None,
    positions: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    return_hidden: bool = False,
) -> torch.Tensor:
    """`model(in_idx)` with fused kernels: logits (batch, tokens, vocab).

    The optional arguments serve generation and the packed loss: `cache` keeps keys and
    values between calls, `positions` gives each token's position when it is not 0, 1,
    2, ... (left-padded or packed batches), `attn_mask` replaces the causal mask, and
    `return_hidden=True` returns the input of `out_head` (batch, tokens, emb_dim).
    """
    _, seq_len = in_idx.shape
    if positions is None:
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + seq_len, device=in_idx.device)
    x = model.drop_emb(model.tok_emb(in_idx) + model.pos_emb(positions))
    for layer, block in enumerate(model.trf_blocks):
        shortcut = _attention(block.att, _layer_norm(block.norm1, x), cache, layer, attn_mask)
        x = x + block.drop_shortcut(shortcut)
        ff = block.ff.layers  # Linear, GELU, Linear
        hidden = F.gelu(linear(ff[0], _layer_norm(block.norm2, x)), approximate="tanh")
        hidden = linear(ff[2], hidden)
        x = x + block.drop_shortcut(hidden)
    if cache is not None:
        cache.length += seq_len
    x = _layer_norm(model.final_norm, x)
    return x if return_hidden else linear(model.out_head, x)


def last_token_logits(model: helpers.GPTModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (batch, vocab) of the last position only, from hidden (batch, tokens, emb_dim)."""
    return linear(model.out_head, hidden[:, -1, :])


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None):
    """The book's choice of the next token from last-position logits (batch, vocab)."""
    if top_k is not None:
        top_logits, _ = torch.topk(logits, top_k)
        logits = torch.where(logits < top_logits[:, -1:], float("-inf"), logits)
    if temperature > 0.0:
        return torch.multinomial(torch.softmax(logits / temperature, dim=-1), num_samples=1)
    return torch.argmax(logits, dim=-1, keepdim=True)


@torch.no_grad()
def generate_fast(
    model: helpers.GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """`helpers.generate` with a key/value cache: the same tokens, many times faster.

    `generate` runs the whole text through the model for every new token. Here the
    prompt runs once, filling a KVCache, and then each step feeds only the newest
    token. Once the text is longer than `context_size`, the window slides, every
    token's position changes and cached keys no longer fit, so from then on each step
    recomputes the window exactly like `generate`.
    """
    _require_gpt_model(model, "generate_fast")
    if idx.dim() != 2:
        raise ValueError(
            f"idx must be (batch, tokens), got shape {tuple(idx.shape)}: use idx.unsqueeze(0)."
        )
    cache = None
    for _ in range(max_new_tokens):
        if idx.shape[1] > context_size:  # sliding window: like generate
            hidden = forward(model, idx[:, -context_size:], return_hidden=True)
        elif cache is None:  # the prompt, once
            cache_len = min(context_size, idx.shape[1] + max_new_tokens - 1)
            cache = KVCache(len(model.trf_blocks), cache_len)
            hidden = forward(model, idx, cache=cache, return_hidden=True)
        else:  # only the newest token
            hidden = forward(model, idx[:, -1:], cache=cache, return_hidden=True)
        idx_next = next_token(last_token_logits(model, hidden), temperature, top_k)
        if eos_id is not None and bool((idx_next == eos_id).all()):
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


@torch.no_grad()
def generate_batch(
    model: helpers.GPTModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    context_size: int,
    eos_id: int | None = None,
    batch_size: int = 8,
) -> list[list[int]]:
    """Greedy continuations of many prompts, `batch_size` at a time, with a KVCache.

    Returns, for each prompt, the new tokens only: exactly those that `generate` appends
    to that prompt alone (without the final `eos_id`). Prompts are sorted by length so
    that a batch needs little padding; shorter ones are padded on the left, and
    per-row positions and an attention mask make the padding invisible. A row that
    produces `eos_id` stops and leaves the batch. Prompts that would outgrow
    `context_size` go through `generate_fast` one at a time (their window slides).
    """
    _require_gpt_model(model, "generate_batch")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"Prompt {i} is empty: every prompt needs at least one token.")
    results: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return results
    device = model.pos_emb.weight.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batched = []
    for i in order:
        if len(prompts[i]) + max_new_tokens - 1 <= context_size:
            batched.append(i)
        else:
            idx = torch.tensor([list(prompts[i])], device=device)
            out = generate_fast(model, idx, max_new_tokens, context_size, eos_id=eos_id)
            results[i] = out[0, len(prompts[i]) :].tolist()
    for first in range(0, len(batched), batch_size):
        rows = batched[first : first + batch_size]
        new_tokens = _generate_left_padded(
            model, [prompts[i] for i in rows], max_new_tokens, eos_id
        )
        for i, tokens in zip(rows, new_tokens, strict=True):
            results[i] = tokens
    return results


def _generate_left_padded(model, prompts, max_new_tokens, eos_id):
    """One batch of generate_batch: greedy, cached, rows leave when they produce eos_id."""
    device = model.pos_emb.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    pad = width - lengths  # padding tokens in front of each row
    idx = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        idx[row, width - len(prompt) :] = torch.tensor(list(prompt), device=device)

    total = width + max_new_tokens - 1  # tokens the cache will hold
    cols = torch.arange(total, device=device)
    key_is_real = cols[None, :] >= pad[:, None]  # (rows, total): False on padding
    # prompt: causal attention over real tokens; a padding token attends to itself
    # only (its output is never used, but must not be NaN)
    q = cols[:width, None]
    k = cols[None, :width]
    mask = (k <= q) & (key_is_real[:, None, :width] | (k == q))
    positions = (cols[None, :width] - pad[:, None]).clamp(min=0)

    cache = KVCache(len(model.trf_blocks), total)
    hidden = forward(
        model, idx, cache=cache, positions=positions, attn_mask=mask[:, None], return_hidden=True
    )
    active = list(range(len(prompts)))  # which prompts the batch rows are
    next_position = lengths.clone()
    new_tokens: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        idx_next = last_token_logits(model, hidden).argmax(dim=-1)
        finished = [False] * len(active)
        for row, token in enumerate(idx_next.tolist()):
            if eos_id is not None and token == eos_id:
                finished[row] = True
            else:
                new_tokens[active[row]].append(token)
        if step == max_new_tokens - 1 or all(finished):
            break
        if any(finished):
            keep = torch.tensor([not f for f in finished], device=device)
            rows = keep.nonzero().squeeze(1)
            cache.keep_rows(rows)
            idx_next, next_position = idx_next[rows], next_position[rows]
            key_is_real = key_is_real[rows]
            active = [a for a, f in zip(active, finished, strict=True) if not f]
        seen = cache.length + 1
        hidden = forward(
            model,
            idx_next[:, None],
            cache=cache,
            positions=next_position[:, None],
            attn_mask=key_is_real[:, None, None, :seen],
            return_hidden=True,
        )
        next_position += 1
    return new_tokens


def pack_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, emb_dim: int):
    """The batch without its trailing padding, as one sequence of rows side by side.

    A row's positions after its last counted target influence no counted target
    (attention looks only backwards), so they can be dropped. The remaining tokens of
    all rows go into one (1, n) sequence, with each token's position within its row and
    an attention mask that lets a token see only the earlier tokens of its own row:
    the very same computation without the padding. Attention over one long sequence
    costs more than over short rows, so this returns None (keep the batch as it is)
    unless the matrix products saved outweigh it.
    Returns (input ids, positions, attention mask, targets) or None.
    """
    batch, tokens = input_batch.shape
    cols = torch.arange(tokens, device=input_batch.device)
    counted = target_batch != -100
    last = torch.where(counted, cols, -1).amax(dim=1)  # last counted position of each row
    needed = cols[None, :] <= last[:, None]
    n = int(needed.sum())
    # per block, a dropped token saves 12 x emb_dim^2 multiply-adds in the matrix
    # products; each extra attention score costs 2 x emb_dim (n x n scores instead of
    # batch x tokens^2 / 2 for causal rows): compare both, divided by 2 x emb_dim
    saved = 6 * emb_dim * (batch * tokens - n)
    added = n * n - batch * tokens * tokens // 2
    if n == 0 or n == batch * tokens or saved <= added:
        return None
    rows = torch.arange(batch, device=input_batch.device)[:, None].expand(batch, tokens)[needed]
    positions = cols.expand(batch, tokens)[needed]
    attn_mask = (rows[:, None] == rows[None, :]) & (positions[None, :] <= positions[:, None])
    packed_targets = target_batch[needed][None]
    return input_batch[needed][None], positions[None], attn_mask[None, None], packed_targets


def calc_loss_batch_fast(input_batch, target_batch, model, device) -> torch.Tensor:
    """`helpers.calc_loss_batch`, computed with less work: the same loss.

    The output layer (emb_dim x 50,257, the largest matrix product) runs only at the
    positions whose target counts, not at padding or masked instructions, and the
    padding at the end of the rows is left out altogether when that pays (`pack_batch`).
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    packed = pack_batch(input_batch, target_batch, model.tok_emb.embedding_dim)
    if packed is None:
        hidden = forward(model, input_batch, return_hidden=True)
    else:
        input_batch, positions, attn_mask, target_batch = packed
        hidden = forward(
            model, input_batch, positions=positions, attn_mask=attn_mask, return_hidden=True
        )
    counted = target_batch != -100
    logits = model.out_head(hidden[counted])  # (counted targets, vocab_size)
    return F.cross_entropy(logits, target_batch[counted])


def calc_loss_loader_fast(data_loader, model, device, num_batches=None) -> float:
    """`helpers.calc_loss_loader` over `calc_loss_batch_fast`."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch_fast(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model_fast(model, train_loader, val_loader, device, eval_iter):
    """`helpers.evaluate_model` over `calc_loss_batch_fast`."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader_fast(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader_fast(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss
