"""GPTModel's names, shapes and parameter counts (the book's), and generate()."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import helpers
from course.settings import OFFLINE_MODEL, model_config, model_file_stem, resolve_model_name

TINY = {
    "vocab_size": 50,
    "context_length": 8,
    "emb_dim": 12,
    "n_heads": 3,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


def book_state_dict_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every entry of the book's GPTModel state_dict with its shape."""
    v, c, d = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"]
    shapes = {"tok_emb.weight": (v, d), "pos_emb.weight": (c, d)}
    for i in range(cfg["n_layers"]):
        block = f"trf_blocks.{i}"
        for name in ("W_query", "W_key", "W_value"):
            shapes[f"{block}.att.{name}.weight"] = (d, d)
            if cfg["qkv_bias"]:
                shapes[f"{block}.att.{name}.bias"] = (d,)
        shapes[f"{block}.att.out_proj.weight"] = (d, d)
        shapes[f"{block}.att.out_proj.bias"] = (d,)
        shapes[f"{block}.att.mask"] = (c, c)
        shapes[f"{block}.ff.layers.0.weight"] = (4 * d, d)
        shapes[f"{block}.ff.layers.0.bias"] = (4 * d,)
        shapes[f"{block}.ff.layers.2.weight"] = (d, 4 * d)
        shapes[f"{block}.ff.layers.2.bias"] = (d,)
        for norm in ("norm1", "norm2"):
            shapes[f"{block}.{norm}.scale"] = (d,)
            shapes[f"{block}.{norm}.shift"] = (d,)
    shapes["final_norm.scale"] = (d,)
    shapes["final_norm.shift"] = (d,)
    shapes["out_head.weight"] = (v, d)
    return shapes


def meta_model(cfg: dict) -> helpers.GPTModel:
    """A GPTModel without memory behind its tensors: names and shapes only."""
    with torch.device("meta"):
        return helpers.GPTModel(cfg)


# --- names, shapes, sizes ---------------------------------------------------


def test_gpt2_small_state_dict_names_and_shapes():
    cfg = model_config("gpt2-small (124M)")
    assert cfg == {
        "vocab_size": 50257,
        "context_length": 1024,
        "drop_rate": 0.0,
        "qkv_bias": True,
        "emb_dim": 768,
        "n_layers": 12,
        "n_heads": 12,
    }
    state = meta_model(cfg).state_dict()
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    assert shapes == book_state_dict_shapes(cfg)
    assert len(shapes) == 5 + 12 * 17
    # spot checks with the numbers written out
    assert shapes["tok_emb.weight"] == (50257, 768)
    assert shapes["trf_blocks.11.att.W_query.weight"] == (768, 768)
    assert shapes["trf_blocks.0.att.mask"] == (1024, 1024)
    assert shapes["final_norm.scale"] == (768,)
    assert shapes["out_head.weight"] == (50257, 768)
    assert list(state)[:2] == ["tok_emb.weight", "pos_emb.weight"]


@pytest.mark.parametrize(
    ("name", "qkv_bias", "expected"),
    [
        # the book's chapter 4 counts (GPT_CONFIG_124M has qkv_bias=False): untied head
        ("gpt2-small (124M)", False, 163_009_536),
        ("gpt2-medium (355M)", False, 406_212_608),
        # with OpenAI's query/key/value biases: 3 * emb_dim more per block
        ("gpt2-small (124M)", True, 163_009_536 + 3 * 768 * 12),
        ("gpt2-medium (355M)", True, 406_212_608 + 3 * 1024 * 24),
    ],
)
def test_parameter_counts(name, qkv_bias, expected):
    cfg = {**model_config(name), "qkv_bias": qkv_bias}
    model = meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert total == expected
    # the mask is a buffer, not a parameter
    assert all("mask" not in n for n, _ in model.named_parameters())


def test_model_names_resolve():
    assert resolve_model_name("gpt2-medium") == "gpt2-medium (355M)"
    assert resolve_model_name("355M") == "gpt2-medium (355M)"
    assert resolve_model_name("offline") == OFFLINE_MODEL
    assert model_file_stem("gpt2-medium (355M)") == "gpt2-medium355M"
    assert model_file_stem("offline") == "offlinetiny"
    with pytest.raises(ValueError, match="gpt2-small"):
        resolve_model_name("gpt3")


# --- an independent module tree with the book's names -------------------------


class RefAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, c = cfg["emb_dim"], cfg["context_length"]
        self.n_heads = cfg["n_heads"]
        self.W_query = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.W_key = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.W_value = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.out_proj = nn.Linear(d, d)
        self.register_buffer("mask", torch.triu(torch.ones(c, c), diagonal=1))

    def forward(self, x):
        b, n, d = x.shape

        def heads(t):
            return t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class RefNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))
        self.shift = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.scale, self.shift, eps=1e-5)


class RefFeedForward(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d)
        )

    def forward(self, x):
        return self.layers(x)


class RefBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = RefAttention(cfg)
        self.ff = RefFeedForward(cfg["emb_dim"])
        self.norm1 = RefNorm(cfg["emb_dim"])
        self.norm2 = RefNorm(cfg["emb_dim"])

    def forward(self, x):
        x = x + self.att(self.norm1(x))
        return x + self.ff(self.norm2(x))


class RefGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.trf_blocks = nn.Sequential(*[RefBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = RefNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        return self.out_head(self.final_norm(self.trf_blocks(x)))


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter random values (norms too), so no mapping hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval()


def test_book_state_dict_loads_strictly_and_computes_the_same():
    reference = randomized(RefGPT(TINY), seed=1)
    model = helpers.GPTModel(TINY)
    model.load_state_dict(reference.state_dict(), strict=True)
    model.eval()
    idx = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8], [1, 2, 3, 4, 5, 6, 7, 49]])
    with torch.no_grad():
        expected = reference(idx)
        got = model(idx)
    assert got.shape == (2, 8, 50)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # causal: the logits for the first tokens do not depend on later ones
    with torch.no_grad():
        prefix = model(idx[:, :3])
    torch.testing.assert_close(prefix, got[:, :3], atol=1e-5, rtol=1e-4)


def test_state_dict_loads_back_into_the_book_tree(tmp_path):
    model = randomized(helpers.GPTModel(TINY), seed=2)
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    reference = RefGPT(TINY)
    reference.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reference.state_dict()[name], tensor), name


# --- generate ---------------------------------------------------------------


def counting_model(vocab: int = 16) -> helpers.GPTModel:
    """A real GPTModel rigged to predict token t + 1 after token t (mod vocab).

    Token embeddings are one-hot, attention and feed-forward add nothing (zero output
    projections), and the output head maps one-hot t to t + 1.
    """
    cfg = {**TINY, "vocab_size": vocab, "emb_dim": vocab, "n_heads": 2, "context_length": 32}
    model = helpers.GPTModel(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.copy_(torch.eye(vocab))
        model.pos_emb.weight.zero_()
        for block in model.trf_blocks:
            for layer in (block.att.out_proj, block.ff.layers[2]):
                layer.weight.zero_()
                layer.bias.zero_()
        model.out_head.weight.copy_(torch.roll(torch.eye(vocab), shifts=1, dims=0))
    return model


def test_counting_model_is_rigged_as_intended():
    model = counting_model()
    with torch.no_grad():
        logits = model(torch.tensor([[3, 15]]))
    assert logits.argmax(-1).tolist() == [[4, 0]]


def test_generate_greedy_continues():
    model = counting_model()
    out = helpers.generate(model, torch.tensor([[2]]), max_new_tokens=5, context_size=32)
    assert out.tolist() == [[2, 3, 4, 5, 6, 7]]


def test_generate_stops_at_eos():
    model = counting_model()
    start = torch.tensor([[2, 3]])
    # eos (token 9) would come after 6 new tokens: 4..9; generation stops before it
    out = helpers.generate(model, start, max_new_tokens=20, context_size=32, eos_id=9)
    assert out.tolist() == [[2, 3, 4, 5, 6, 7, 8]]
    # without eos_id it runs the full length, through the wrap-around
    out = helpers.generate(model, start, max_new_tokens=20, context_size=32)
    assert out.shape == (1, 22)
    assert out[0, -1].item() == (3 + 20) % 16
    # the first new token is eos: nothing is added
    out = helpers.generate(model, start, max_new_tokens=5, context_size=32, eos_id=4)
    assert out.tolist() == [[2, 3]]


def test_generate_greedy_is_deterministic():
    torch.manual_seed(0)
    model = helpers.GPTModel(TINY).eval()
    idx = torch.tensor([[1, 2, 3]])
    first = helpers.generate(model, idx, max_new_tokens=6, context_size=8)
    torch.manual_seed(999)  # greedy decoding uses no randomness
    second = helpers.generate(model, idx, max_new_tokens=6, context_size=8)
    assert torch.equal(first, second)
    assert first.shape == (1, 9)
    assert torch.equal(first[:, :3], idx)


class FixedLogits(nn.Module):
    """Logits 0, 1, ..., vocab-1 at every position; records what it was given."""

    def __init__(self, vocab: int = 10):
        super().__init__()
        self.vocab = vocab
        self.seen: list[torch.Tensor] = []

    def forward(self, idx):
        self.seen.append(idx.clone())
        return torch.arange(self.vocab, dtype=torch.float).expand(*idx.shape, self.vocab)


def test_generate_top_k_and_temperature_sampling():
    model = FixedLogits(vocab=10)
    idx = torch.tensor([[0, 1], [2, 3]])
    torch.manual_seed(123)
    out = helpers.generate(model, idx, max_new_tokens=60, context_size=4, temperature=1.5, top_k=3)
    assert out.shape == (2, 62)
    new = out[:, 2:]
    assert set(new.unique().tolist()) == {7, 8, 9}, "only the top 3 may be sampled"
    torch.manual_seed(123)
    again = helpers.generate(
        model, idx, max_new_tokens=60, context_size=4, temperature=1.5, top_k=3
    )
    assert torch.equal(out, again), "the same seed gives the same samples"


def test_generate_low_temperature_prefers_the_top_token():
    model = FixedLogits(vocab=10)
    torch.manual_seed(0)
    out = helpers.generate(
        model, torch.tensor([[0]]), max_new_tokens=50, context_size=4, temperature=0.05
    )
    # logits 9 vs 8 at temperature 0.05: the runner-up has probability e^-20
    assert (out[0, 1:] == 9).all()
    assert math.exp(-1 / 0.05) < 1e-8


def test_generate_crops_the_context():
    model = FixedLogits(vocab=10)
    idx = torch.arange(7).unsqueeze(0)
    out = helpers.generate(model, idx, max_new_tokens=3, context_size=4)
    assert out.tolist() == [[0, 1, 2, 3, 4, 5, 6, 9, 9, 9]]
    assert [t.tolist() for t in model.seen] == [[[3, 4, 5, 6]], [[4, 5, 6, 9]], [[5, 6, 9, 9]]]


def test_generate_on_gpt_model_longer_than_its_context():
    model = counting_model()  # context_length 32
    idx = torch.tensor([[5] * 40])
    out = helpers.generate(model, idx, max_new_tokens=3, context_size=32)
    assert out[0, 40:].tolist() == [6, 7, 8]
