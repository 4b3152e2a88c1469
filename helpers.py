"""The code of chapter 7 of *Build a Large Language Model (From Scratch)*, in notebook order.

Names and signatures are the book's, so you can read this file next to the book:

1. the dataset and its prompts        (notebook 01)
2. the tokenizer and batching         (notebooks 02, 03)
3. the GPT model                      (notebook 04)
4. generating text                    (notebooks 04, 07)
5. pretrained weights                 (notebook 04)
6. training                           (notebooks 05, 06)
7. scoring with an LLM judge          (notebook 09)
8. LoRA, exercise 7.4 (appendix E)    (notebook 05)

This is the plain, readable version of every step. What makes the course fast and
robust (a key/value cache, resumable training, downloads that resume, the judge's
statistics) lives beside it in the `course/` package, which imports this file and
computes the same results; this file imports nothing from there.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------
# 1. The dataset and its prompts (notebook 01)
# ---------------------------------------------------------------------------


def download_and_load_file(file_path, url):
    """Listing 7.1: download the dataset if `file_path` is missing, then load it.

    Each entry must be an object with the string fields "instruction", "input" and
    "output"; a malformed entry stops here with its number.
    """
    if not os.path.exists(file_path):
        with urllib.request.urlopen(url, timeout=60) as response:
            text_data = response.read().decode("utf-8")
        with open(file_path, "w", encoding="utf-8") as file:
            file.write(text_data)
    with open(file_path, encoding="utf-8-sig") as file:  # -sig: a UTF-8 BOM is fine
        data = json.load(file)
    if not isinstance(data, list):
        raise ValueError(f"{file_path}: expected a JSON list of entries.")
    for index, entry in enumerate(data):
        for field in ("instruction", "input", "output"):
            if not isinstance(entry, dict) or not isinstance(entry.get(field), str):
                raise ValueError(
                    f'{file_path}: entry {index} has no string field "{field}". Every entry '
                    'needs "instruction", "input" (may be "") and "output": fix that entry.'
                )
    return data


def format_input(entry, style="alpaca"):
    """Listing 7.2: the prompt of one entry, without its response.

    style="alpaca" is the book's format; "phi3" is exercise 7.1's <|user|> format.
    """
    if style == "alpaca":
        instruction_text = (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
            f"\n\n### Instruction:\n{entry['instruction']}"
        )
        input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
        return instruction_text + input_text
    if style == "phi3":
        input_text = f"\n{entry['input']}" if entry["input"] else ""
        return f"<|user|>\n{entry['instruction']}" + input_text
    raise ValueError(f'Unknown prompt style {style!r}: use "alpaca" or "phi3".')


def format_response(entry, style="alpaca"):
    """What follows the prompt in a training example: the response marker and output."""
    if style == "alpaca":
        return f"\n\n### Response:\n{entry['output']}"
    if style == "phi3":
        return f"\n<|assistant|>:\n{entry['output']}"
    raise ValueError(f'Unknown prompt style {style!r}: use "alpaca" or "phi3".')


def split_data(data):
    """The book's split in file order: 85% train, 10% test, the rest (5%) validation."""
    train_portion = int(len(data) * 0.85)
    test_portion = int(len(data) * 0.1)
    train_data = data[:train_portion]
    test_data = data[train_portion : train_portion + test_portion]
    val_data = data[train_portion + test_portion :]
    return train_data, val_data, test_data


# ---------------------------------------------------------------------------
# 2. The tokenizer and batching (notebooks 02, 03)
# ---------------------------------------------------------------------------

TOKENIZER_DIR = HERE / "gpt2-tokenizer"


def get_tokenizer(files_dir=TOKENIZER_DIR):
    """GPT-2's tokenizer, built from the shipped BPE files: no network needed.

    Gives the same ids as the book's `tiktoken.get_encoding("gpt2")`.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(Path(files_dir) / "vocab.bpe"),
        encoder_json_file=str(Path(files_dir) / "encoder.json"),
        # OpenAI's published checksums: a damaged file is refused
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


class InstructionDataset(Dataset):
    """Listing 7.4: pretokenizes every entry as prompt + response.

    With `with_instruction_length=True` an item is `(instruction_length, token_ids)`,
    as in the book's solution to exercise 7.2, for `custom_collate_fn(...,
    mask_instructions=True)`; the lengths are in `instruction_lengths`.
    """

    def __init__(self, data, tokenizer, style="alpaca", with_instruction_length=False):
        self.data = data
        self.with_instruction_length = with_instruction_length
        self.encoded_texts = []
        self.instruction_lengths = []  # tokens of each prompt (instruction and input)
        for entry in data:
            instruction_plus_input = format_input(entry, style)
            full_text = instruction_plus_input + format_response(entry, style)
            self.encoded_texts.append(tokenizer.encode(full_text))
            self.instruction_lengths.append(len(tokenizer.encode(instruction_plus_input)))

    def __getitem__(self, index):
        if self.with_instruction_length:
            return self.instruction_lengths[index], self.encoded_texts[index]
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(
    batch,
    pad_token_id=50256,
    ignore_index=-100,
    allowed_max_length=None,
    device="cpu",
    mask_instructions=False,
):
    """Listing 7.5: pad a batch, shift the targets by one, hide padding from the loss.

    Returns inputs and targets, both (batch, longest item + 1 - 1). Every item gets
    one <|endoftext|> token that stays in its targets (so the model learns to stop);
    further padding becomes `ignore_index`. With `mask_instructions=True` (exercise
    7.2) the items are `(instruction_length, token_ids)` and the prompt is hidden too.
    """
    if mask_instructions and not all(isinstance(item, tuple) for item in batch):
        raise ValueError(
            "mask_instructions=True needs (instruction_length, token_ids) items: build the "
            "dataset with InstructionDataset(..., with_instruction_length=True)."
        )
    items = [item if isinstance(item, tuple) else (0, item) for item in batch]
    batch_max_length = max(len(item) + 1 for _, item in items)

    inputs_lst, targets_lst = [], []
    for instruction_length, item in items:
        new_item = list(item) + [pad_token_id]  # a new list: the dataset's stays as it is
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])  # (batch_max_length - 1,)
        targets = torch.tensor(padded[1:])  # the inputs shifted by one position

        # every padding token but the first becomes ignore_index
        indices = torch.nonzero(targets == pad_token_id).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if mask_instructions and instruction_length > 1:
            targets[: instruction_length - 1] = ignore_index  # targets that are prompt tokens

        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)

    inputs_tensor = torch.stack(inputs_lst).to(device)  # (batch, tokens)
    targets_tensor = torch.stack(targets_lst).to(device)  # (batch, tokens)
    return inputs_tensor, targets_tensor


# ---------------------------------------------------------------------------
# 3. The GPT model (notebook 04; chapter 4 of the book)
# ---------------------------------------------------------------------------

BASE_CONFIG = {
    "vocab_size": 50257,  # vocabulary size
    "context_length": 1024,  # context length
    "drop_rate": 0.0,  # dropout rate
    "qkv_bias": True,  # query-key-value bias
}

model_configs = {
    "gpt2-small (124M)": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium (355M)": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large (774M)": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl (1558M)": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention (listing 3.5 of the book)."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # ones above the diagonal: the future positions a token may not look at
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), 1))

    def forward(self, x):
        b, num_tokens, d_in = x.shape  # (batch, tokens, d_in)
        keys = self.W_key(x)  # (b, num_tokens, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)

        # split d_out into heads: (b, num_tokens, num_heads, head_dim) -> (b, heads, tokens, head_dim)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        attn_scores = queries @ keys.transpose(2, 3)  # (b, heads, tokens, tokens)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)

        context_vec = (attn_weights @ values).transpose(1, 2)  # (b, tokens, heads, head_dim)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)  # (b, tokens, d_out)


class LayerNorm(nn.Module):
    """Normalize each token's embedding to mean 0 and variance 1, then scale and shift."""

    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class GELU(nn.Module):
    """GPT-2's activation: the tanh approximation of GELU."""

    def forward(self, x):
        return (
            0.5
            * x
            * (
                1
                + torch.tanh(
                    torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))
                )
            )
        )


class FeedForward(nn.Module):
    """Expand each token to 4 x emb_dim, apply GELU, project back."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Layer norm, attention, shortcut; layer norm, feed-forward, shortcut."""

    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        x = self.att(x)  # (batch, tokens, emb_dim)
        x = self.drop_shortcut(x)
        x = x + shortcut

        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_shortcut(x)
        return x + shortcut


class GPTModel(nn.Module):
    """GPT-2 (listing 4.7 of the book): embeddings, transformer blocks, output head."""

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        batch_size, seq_len = in_idx.shape  # token ids (batch, tokens)
        tok_embeds = self.tok_emb(in_idx)  # (batch, tokens, emb_dim)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = tok_embeds + pos_embeds
        x = self.drop_emb(x)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)  # logits (batch, tokens, vocab_size)


# ---------------------------------------------------------------------------
# 4. Generating text (notebooks 04, 07)
# ---------------------------------------------------------------------------


def text_to_token_ids(text, tokenizer):
    """Encode `text` as a (1, tokens) tensor."""
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded).unsqueeze(0)  # add the batch dimension


def token_ids_to_text(token_ids, tokenizer):
    """Decode a (1, tokens) tensor."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())


def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    """Extend `idx` (batch, tokens) by up to `max_new_tokens` tokens, one forward pass each.

    Greedy when temperature is 0; otherwise the `top_k` most likely tokens are sampled
    after dividing the logits by the temperature. Stops at `eos_id`.
    """
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]  # the last context_size tokens
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]  # (batch, vocab_size): the last position only

        if top_k is not None:
            top_logits, _ = torch.topk(logits, top_k)
            min_val = top_logits[:, -1]
            logits = torch.where(
                logits < min_val[:, None], torch.tensor(float("-inf")).to(logits.device), logits
            )
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)  # (batch, 1)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # (batch, 1)

        if eos_id is not None and bool((idx_next == eos_id).all()):
            break
        idx = torch.cat((idx, idx_next), dim=1)  # (batch, tokens + 1)
    return idx


RESPONSE_MARKERS = {"alpaca": "### Response:", "phi3": "<|assistant|>:"}


def extract_response(generated_text, input_text, style="alpaca"):
    """Listing 7.9's extraction: cut the prompt, drop the response marker, strip."""
    return generated_text[len(input_text) :].replace(RESPONSE_MARKERS[style], "").strip()


# ---------------------------------------------------------------------------
# 5. Pretrained weights (notebook 04; chapter 5 of the book)
# ---------------------------------------------------------------------------

GPT2_FILES = [
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
]
GPT2_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
GPT2_BACKUP_BASE_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"


def download_file(url, destination, backup_url=None):
    """Download `url` to `destination` unless it exists, trying `backup_url` on failure.

    The bytes go to `destination + ".part"` first, so an interrupted download never
    leaves a half file under the final name.
    """
    from tqdm import tqdm

    if os.path.exists(destination):
        return
    for attempt_url in [url] + ([backup_url] if backup_url else []):
        try:
            with urllib.request.urlopen(attempt_url, timeout=60) as response:
                total = int(response.headers.get("Content-Length", 0)) or None
                with (
                    open(destination + ".part", "wb") as file,
                    tqdm(
                        total=total, unit="iB", unit_scale=True, desc=os.path.basename(destination)
                    ) as bar,
                ):
                    for chunk in iter(lambda: response.read(1 << 16), b""):
                        file.write(chunk)
                        bar.update(len(chunk))
            os.replace(destination + ".part", destination)
            return
        except OSError as error:  # URLError and HTTPError are OSErrors
            print(f"Could not download {attempt_url}: {error}")
    raise ConnectionError(f"Could not download {os.path.basename(destination)} from any source.")


def download_and_load_gpt2(model_size, models_dir):
    """Download OpenAI's GPT-2 checkpoint (seven files) and return (settings, params)."""
    import tensorflow as tf

    allowed_sizes = ("124M", "355M", "774M", "1558M")
    if model_size not in allowed_sizes:
        raise ValueError(f"Model size not in {allowed_sizes}")
    model_dir = os.path.join(models_dir, model_size)
    os.makedirs(model_dir, exist_ok=True)
    for filename in GPT2_FILES:
        download_file(
            f"{GPT2_BASE_URL}/{model_size}/{filename}",
            os.path.join(model_dir, filename),
            backup_url=f"{GPT2_BACKUP_BASE_URL}/{model_size}/{filename}",
        )
    tf_ckpt_path = tf.train.latest_checkpoint(model_dir)
    with open(os.path.join(model_dir, "hparams.json"), encoding="utf-8") as file:
        settings = json.load(file)
    params = load_gpt2_params_from_tf_ckpt(tf_ckpt_path, settings)
    return settings, params


def load_gpt2_params_from_tf_ckpt(ckpt_path, settings):
    """OpenAI's TensorFlow variables as nested dicts of NumPy arrays.

    `model/h3/attn/c_attn/w` becomes `params["blocks"][3]["attn"]["c_attn"]["w"]`,
    `model/wte` becomes `params["wte"]`, `model/ln_f/g` becomes `params["g"]`.
    """
    import tensorflow as tf

    params = {"blocks": [{} for _ in range(settings["n_layer"])]}
    for name, _ in tf.train.list_variables(ckpt_path):
        variable_array = np.squeeze(tf.train.load_variable(ckpt_path, name))
        variable_name_parts = name.split("/")[1:]  # drop the leading "model"
        target_dict = params
        if variable_name_parts[0].startswith("h"):
            target_dict = params["blocks"][int(variable_name_parts[0][1:])]
        for key in variable_name_parts[1:-1]:
            target_dict = target_dict.setdefault(key, {})
        target_dict[variable_name_parts[-1]] = variable_array
    return params


def assign(left, right):
    """A parameter holding `right`, after checking it has the shape of `left`."""
    if left.shape != right.shape:
        raise ValueError(f"Shape mismatch. Left: {left.shape}, Right: {right.shape}")
    return torch.nn.Parameter(torch.tensor(right))


def load_weights_into_gpt(gpt, params):
    """Copy OpenAI's GPT-2 weights into a GPTModel (the book's mapping)."""
    gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe"])
    gpt.tok_emb.weight = assign(gpt.tok_emb.weight, params["wte"])

    for b in range(len(params["blocks"])):
        block, p = gpt.trf_blocks[b], params["blocks"][b]
        # OpenAI stores query, key and value as one matrix: split it in three
        q_w, k_w, v_w = np.split(p["attn"]["c_attn"]["w"], 3, axis=-1)
        block.att.W_query.weight = assign(block.att.W_query.weight, q_w.T)
        block.att.W_key.weight = assign(block.att.W_key.weight, k_w.T)
        block.att.W_value.weight = assign(block.att.W_value.weight, v_w.T)
        q_b, k_b, v_b = np.split(p["attn"]["c_attn"]["b"], 3, axis=-1)
        block.att.W_query.bias = assign(block.att.W_query.bias, q_b)
        block.att.W_key.bias = assign(block.att.W_key.bias, k_b)
        block.att.W_value.bias = assign(block.att.W_value.bias, v_b)

        block.att.out_proj.weight = assign(block.att.out_proj.weight, p["attn"]["c_proj"]["w"].T)
        block.att.out_proj.bias = assign(block.att.out_proj.bias, p["attn"]["c_proj"]["b"])
        block.ff.layers[0].weight = assign(block.ff.layers[0].weight, p["mlp"]["c_fc"]["w"].T)
        block.ff.layers[0].bias = assign(block.ff.layers[0].bias, p["mlp"]["c_fc"]["b"])
        block.ff.layers[2].weight = assign(block.ff.layers[2].weight, p["mlp"]["c_proj"]["w"].T)
        block.ff.layers[2].bias = assign(block.ff.layers[2].bias, p["mlp"]["c_proj"]["b"])

        block.norm1.scale = assign(block.norm1.scale, p["ln_1"]["g"])
        block.norm1.shift = assign(block.norm1.shift, p["ln_1"]["b"])
        block.norm2.scale = assign(block.norm2.scale, p["ln_2"]["g"])
        block.norm2.shift = assign(block.norm2.shift, p["ln_2"]["b"])

    gpt.final_norm.scale = assign(gpt.final_norm.scale, params["g"])
    gpt.final_norm.shift = assign(gpt.final_norm.shift, params["b"])
    gpt.out_head.weight = assign(gpt.out_head.weight, params["wte"])  # GPT-2 ties these


# ---------------------------------------------------------------------------
# 6. Training (notebooks 05, 06)
# ---------------------------------------------------------------------------


def calc_loss_batch(input_batch, target_batch, model, device):
    """Mean cross-entropy of one batch; targets of -100 are left out."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (batch, tokens, vocab_size)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader, model, device, num_batches=None):
    """Average loss over the first `num_batches` batches of `data_loader` (all if None)."""
    total_loss = 0.0
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    """Training and validation loss on `eval_iter` batches each, without gradients."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, device, start_context):
    """Print 50 greedy tokens after `start_context`, on one line."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate(model, encoded, max_new_tokens=50, context_size=context_size)
    decoded_text = token_ids_to_text(token_ids, tokenizer)
    print(decoded_text.replace("\n", " "))
    model.train()


def train_model_simple(
    model,
    train_loader,
    val_loader,
    optimizer,
    device,
    num_epochs,
    eval_freq,
    eval_iter,
    start_context,
    tokenizer,
):
    """Listing 7.8 (from chapter 5): train, evaluate every `eval_freq` steps, print a sample.

    Returns the training losses, validation losses and tokens seen at each evaluation.
    """
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1

    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()  # reset the gradients of the previous step
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()  # gradients of the loss
            optimizer.step()  # update the weights
            tokens_seen += input_batch.numel()
            global_step += 1

            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter
                )
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(
                    f"Ep {epoch + 1} (Step {global_step:06d}): "
                    f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
                )
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path=None):
    """Losses against epochs, with tokens seen on a second x-axis (figure 7.17)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # a second x-axis that shares the y-axis
    ax2.plot(tokens_seen, train_losses, alpha=0)  # invisible: aligns the ticks
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


# ---------------------------------------------------------------------------
# 7. Scoring with an LLM judge (notebook 09)
# ---------------------------------------------------------------------------


def check_if_running(process_name):
    """True when a local process whose name contains `process_name` runs."""
    import psutil

    for proc in psutil.process_iter(["name"]):
        if process_name in (proc.info.get("name") or ""):
            return True
    return False


def query_model(prompt, model="llama3", url="http://localhost:11434/api/chat", timeout=300):
    """Listing 7.10: send `prompt` to Ollama's chat API and return the reply.

    The options make the answer reproducible: a fixed seed, temperature 0 (always the
    most likely token) and a 2,048-token context. `timeout` bounds each wait for data.
    """
    data = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }
    payload = json.dumps(data).encode("utf-8")
    request = urllib.request.Request(url, data=payload, method="POST")
    request.add_header("Content-Type", "application/json")

    response_data = ""
    with urllib.request.urlopen(request, timeout=timeout) as response:
        while True:  # Ollama streams one JSON object per line
            line = response.readline(1 << 20).decode("utf-8")
            if not line:
                break
            response_json = json.loads(line)
            if "error" in response_json:
                raise RuntimeError(f"The Ollama server failed: {response_json['error']}")
            response_data += response_json["message"]["content"]
    return response_data


def judge_prompt(entry, json_key):
    """The book's scoring prompt for one entry and the response under `json_key`."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[json_key]}`"
        " on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


def parse_score(reply):
    """The score in a judge's reply: an integer from 0 to 100, else None.

    The book calls int(reply); judges also answer "Score: 85" or "85/100", so the
    first number counts, after dropping the scale itself ("0 to 100", "/100").
    """
    text = re.sub(r"\b0\s*(?:to|-|–)\s*100\b|(?:/|\bout of)\s*100\b", " ", reply)
    match = re.search(r"(?<![\w.])-?\d+(?:[.,]\d+)?(?![\w.]\d)", text)
    if match is None or not re.fullmatch(r"\d{1,3}", match.group()):
        return None  # no number, a negative or fractional one, or too many digits
    score = int(match.group())
    return score if score <= 100 else None


def generate_model_scores(
    json_data, json_key, model="llama3", url="http://localhost:11434/api/chat"
):
    """Listing 7.11: ask the judge for a 0-100 score of every entry's response."""
    from tqdm import tqdm

    scores = []
    for entry in tqdm(json_data, desc="Scoring entries"):
        reply = query_model(judge_prompt(entry, json_key), model, url)
        score = parse_score(reply)
        if score is None:
            print(f"Could not convert score: {reply!r}")
            continue
        scores.append(score)
    return scores


# ---------------------------------------------------------------------------
# 8. Exercise 7.4: LoRA (appendix E)
# ---------------------------------------------------------------------------


class LoRALayer(nn.Module):
    """A low-rank update alpha * (x @ A @ B): rank * (in_dim + out_dim) parameters."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))  # (in_dim, rank)
        nn.init.kaiming_uniform_(self.A, a=5**0.5)  # as nn.Linear initializes its weight
        self.B = nn.Parameter(torch.zeros(rank, out_dim))  # (rank, out_dim): zero, a no-op
        self.alpha = alpha

    def forward(self, x):  # (..., in_dim) -> (..., out_dim)
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    """A (frozen) nn.Linear plus a LoRALayer of the same shape: W x + b + alpha x A B."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):
    """Replace every nn.Linear inside `model` by a LinearWithLoRA around it, in place."""
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)
