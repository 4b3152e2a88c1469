"""The fast paths compute what the book's plain algorithm computes.

Fused attention, layer norm and GELU against the book's step-by-step math; the
output layer at counted positions only against the full loss; generate_fast and
generate_batch against the book's generate, token for token; the fused AdamW against
PyTorch's plain AdamW; bf16 autocast on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from gpt2_fixtures import offline_gpt2_files  # noqa: F401

import helpers

EOS = 50256


def plain_twin(model: helpers.GPTModel, cfg: dict) -> helpers.GPTModel:
    """A model with the book's math and the very same weights."""
    plain = helpers.GPTModel({**cfg, "fast": False})
    plain.load_state_dict(model.state_dict())
    return plain.eval()


@pytest.fixture(scope="module")
def offline_models(offline_gpt2_files, tmp_path_factory):  # noqa: F811
    """The offline checkpoint loaded the way notebook 04 loads GPT-2: (fast, plain)."""
    models_dir = tmp_path_factory.mktemp("models")
    (models_dir / "offline").mkdir()
    for name, data in offline_gpt2_files.items():
        (models_dir / "offline" / name).write_bytes(data)
    _, params = helpers.download_and_load_gpt2("offline", models_dir)
    cfg = helpers.model_config("offline")
    fast = helpers.GPTModel(cfg)
    helpers.load_weights_into_gpt(fast, params)
    fast.eval()
    return fast, plain_twin(fast, cfg)


@pytest.fixture(scope="module")
def tiny_models():
    """The offline model's shape with PyTorch's default random initialisation: (fast,
    plain). Unlike the offline checkpoint, whose greedy output repeats one token, it
    produces varied tokens, so that stopping at eos_id happens at different steps."""
    torch.manual_seed(123)
    cfg = helpers.model_config("offline")
    fast = helpers.GPTModel(cfg).eval()
    return fast, plain_twin(fast, cfg)


@pytest.fixture(params=["offline", "tiny"])
def models(request, offline_models, tiny_models):
    return offline_models if request.param == "offline" else tiny_models


@pytest.fixture(scope="module")
def small_models():
    """A gpt2-small sized model with random weights: (fast, plain)."""
    torch.manual_seed(7)
    cfg = helpers.model_config("gpt2-small")
    fast = helpers.GPTModel(cfg).eval()
    return fast, plain_twin(fast, cfg)


@pytest.fixture(scope="module")
def prompts():
    """Real course prompts of different lengths (test entries, Alpaca format)."""
    tokenizer = helpers.get_tokenizer()
    data = helpers.download_and_load_file(helpers.HERE / "instruction-data.json", helpers.DATA_URL)
    test_data = helpers.split_data(data)[2]
    texts = [helpers.format_input(entry) for entry in test_data[:6]]
    texts += ["Hello", "Every effort moves you"]
    return [tokenizer.encode(text) for text in texts]


def book_new_tokens(model, prompt, max_new_tokens, context_size, eos_id=None):
    out = helpers.generate(
        model, torch.tensor([prompt]), max_new_tokens, context_size, eos_id=eos_id
    )
    return out[0, len(prompt) :].tolist()


def test_state_dict_is_the_books():
    cfg = helpers.model_config("offline")
    fast, plain = helpers.GPTModel(cfg), helpers.GPTModel({**cfg, "fast": False})
    keys = list(fast.state_dict())
    assert keys == list(plain.state_dict())
    for name in (
        "tok_emb.weight",
        "pos_emb.weight",
        "trf_blocks.0.att.W_query.weight",
        "trf_blocks.0.att.mask",
        "trf_blocks.1.att.out_proj.bias",
        "trf_blocks.1.ff.layers.2.weight",
        "trf_blocks.1.norm2.scale",
        "final_norm.shift",
        "out_head.weight",
    ):
        assert name in keys
    assert sum(k.endswith(".att.mask") for k in keys) == cfg["n_layers"]
    # a .pth written by either path loads strictly into the other
    fast.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(fast.state_dict(), strict=True)


@pytest.mark.parametrize("which", ["offline", "small"])
def test_fused_model_matches_plain_math(which, offline_models, small_models):
    fast, plain = offline_models if which == "offline" else small_models
    torch.manual_seed(0)
    x = torch.randint(0, 50257, (2, 37))
    with torch.no_grad():
        a, b = fast(x), plain(x)
    assert a.shape == (2, 37, 50257)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_layer_norm_and_gelu_match_the_book():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 3
    fast_ln, plain_ln = helpers.LayerNorm(16), helpers.LayerNorm(16, fast=False)
    with torch.no_grad():
        fast_ln.scale.copy_(torch.rand(16) + 0.5)
        fast_ln.shift.copy_(torch.randn(16))
    plain_ln.load_state_dict(fast_ln.state_dict())
    assert torch.allclose(fast_ln(x), plain_ln(x), atol=1e-5)
    assert torch.allclose(helpers.GELU()(x), helpers.GELU(fast=False)(x), atol=1e-5)


def training_batch(mask_instructions: bool):
    tokenizer = helpers.get_tokenizer()
    data = helpers.download_and_load_file(helpers.HERE / "instruction-data.json", helpers.DATA_URL)
    dataset = helpers.InstructionDataset(data[:8], tokenizer, with_prompt_length=True)
    batch = [dataset[i] for i in range(8)]
    return helpers.custom_collate_fn(batch, mask_instructions=mask_instructions)


@pytest.mark.parametrize("mask_instructions", [False, True])
@pytest.mark.parametrize("width", [64, 768])
def test_loss_and_gradients_match_plain(mask_instructions, width):
    """Width 64 (the offline model) keeps the batch as it is, width 768 (GPT-2 small's,
    two blocks) packs it: both give the book's loss and gradients."""
    torch.manual_seed(1)
    cfg = {**helpers.model_config("offline"), "emb_dim": width, "n_heads": width // 64}
    fast = helpers.GPTModel(cfg)
    plain = plain_twin(fast, cfg)
    inputs, targets = training_batch(mask_instructions)
    ignored = int((targets == -100).sum())
    assert ignored > 0  # the fast path has positions to skip
    packs = helpers.pack_batch(inputs, targets, width) is not None
    assert packs == (width == 768)
    loss_fast = helpers.calc_loss_batch(inputs, targets, fast, "cpu")
    loss_plain = helpers.calc_loss_batch(inputs, targets, plain, "cpu")
    # the plain path is the book's: mean over the counted targets
    by_hand = torch.nn.functional.cross_entropy(
        plain(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100
    )
    assert abs(loss_plain.item() - by_hand.item()) < 1e-6
    assert abs(loss_fast.item() - loss_plain.item()) < 1e-5
    loss_fast.backward()
    loss_plain.backward()
    grads_plain = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        q = grads_plain[name]
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


def test_loss_of_a_batch_with_nothing_counted_is_nan_in_both():
    cfg = helpers.model_config("offline")
    fast = helpers.GPTModel(cfg)
    plain = plain_twin(fast, cfg)
    inputs = torch.tensor([[1, 2, 3]])
    targets = torch.full((1, 3), -100)
    assert torch.isnan(helpers.calc_loss_batch(inputs, targets, fast, "cpu"))
    assert torch.isnan(helpers.calc_loss_batch(inputs, targets, plain, "cpu"))


@pytest.mark.parametrize("max_new_tokens", [1, 7, 25])
def test_generate_fast_equals_generate(models, prompts, max_new_tokens):
    fast, plain = models
    for prompt in prompts:
        want = book_new_tokens(plain, prompt, max_new_tokens, 1024)
        got = helpers.generate_fast(fast, torch.tensor([prompt]), max_new_tokens, 1024)
        assert got[0, : len(prompt)].tolist() == prompt
        assert got[0, len(prompt) :].tolist() == want


def test_generate_fast_with_plain_math_equals_generate(models, prompts):
    """The cache alone (without fused kernels) gives the book's tokens too."""
    _, plain = models
    for prompt in prompts[:3]:
        got = helpers.generate_fast(plain, torch.tensor([prompt]), 12, 1024)
        assert got[0, len(prompt) :].tolist() == book_new_tokens(plain, prompt, 12, 1024)


def eos_candidates(model, prompts, n=20):
    """Token ids the model does produce (at steps 0, 4 and 9 of three prompts), and
    GPT-2's own end of text: as eos_id they make rows stop at different steps."""
    outputs = [book_new_tokens(model, prompts[i], n, 1024) for i in (0, 1, 6)]
    return [outputs[0][4], outputs[1][0], outputs[2][9], EOS]


def test_generate_fast_stops_at_eos(tiny_models, prompts):
    fast, plain = tiny_models
    lengths = set()
    for eos_id in eos_candidates(plain, prompts):
        for prompt in prompts:
            want = book_new_tokens(plain, prompt, 20, 1024, eos_id=eos_id)
            got = helpers.generate_fast(fast, torch.tensor([prompt]), 20, 1024, eos_id=eos_id)
            assert got[0, len(prompt) :].tolist() == want
            lengths.add(len(want))
    assert {0, 4, 9, 20} <= lengths  # stopped at once, later, and not at all


def test_generate_fast_sliding_window(models, prompts):
    """Beyond context_size the window slides: the cache must give way to recomputing."""
    fast, plain = models
    for prompt, context_size in ((prompts[6], 5), (prompts[7], 8), (prompts[0], 30)):
        want = helpers.generate(plain, torch.tensor([prompt]), 15, context_size)
        got = helpers.generate_fast(fast, torch.tensor([prompt]), 15, context_size)
        assert got.tolist() == want.tolist()


def test_generate_fast_samples_like_generate(models, prompts):
    _, plain = models
    for seed in (1, 2):
        torch.manual_seed(seed)
        want = helpers.generate(
            plain, torch.tensor([prompts[0]]), 10, 1024, temperature=1.4, top_k=20
        )
        torch.manual_seed(seed)
        got = helpers.generate_fast(
            plain, torch.tensor([prompts[0]]), 10, 1024, temperature=1.4, top_k=20
        )
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_generate_batch_equals_generate_alone(models, prompts, batch_size):
    fast, plain = models
    got = helpers.generate_batch(fast, prompts, 20, 1024, batch_size=batch_size)
    assert len(got) == len(prompts)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == book_new_tokens(plain, prompt, 20, 1024)


@pytest.mark.parametrize("batch_size", [3, 8])
def test_generate_batch_stops_each_row_at_its_eos(tiny_models, prompts, batch_size):
    fast, plain = tiny_models
    lengths = set()
    for eos_id in eos_candidates(plain, prompts):
        got = helpers.generate_batch(fast, prompts, 20, 1024, eos_id=eos_id, batch_size=batch_size)
        for prompt, tokens in zip(prompts, got, strict=True):
            want = book_new_tokens(plain, prompt, 20, 1024, eos_id=eos_id)
            assert tokens == want
            assert eos_id not in tokens
            lengths.add(len(tokens))
    assert {0, 4, 9, 20} <= lengths  # rows stopped at different steps, or never


def test_generate_batch_prompts_longer_than_the_context(models, prompts):
    fast, plain = models
    context_size = 40
    assert any(len(p) + 9 > context_size for p in prompts)
    assert any(len(p) + 9 <= context_size for p in prompts)
    got = helpers.generate_batch(fast, prompts, 10, context_size)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == book_new_tokens(plain, prompt, 10, context_size)


def test_gpt2_small_generation_matches(small_models, prompts):
    fast, plain = small_models
    some = [prompts[0], prompts[3], prompts[7]]
    want = [book_new_tokens(plain, p, 4, 1024) for p in some]
    assert [
        helpers.generate_fast(fast, torch.tensor([p]), 4, 1024)[0, len(p) :].tolist() for p in some
    ] == want
    assert helpers.generate_batch(fast, some, 4, 1024, batch_size=3) == want
    eos_id = want[1][1]  # a token the model produces: that row stops after one token
    want_eos = [book_new_tokens(plain, p, 4, 1024, eos_id=eos_id) for p in some]
    assert len(want_eos[1]) == 1
    assert helpers.generate_batch(fast, some, 4, 1024, eos_id=eos_id, batch_size=3) == want_eos


def test_last_token_logits_is_the_output_layer_at_the_last_position(tiny_models):
    fast, _ = tiny_models
    hidden = torch.randn(3, 5, 64)
    with torch.no_grad():
        want = fast.out_head(hidden[:, -1, :])
        got = helpers.last_token_logits(fast, hidden)
    assert got.shape == (3, 50257)
    assert torch.allclose(got, want, atol=1e-5)


def test_generate_batch_edge_cases(offline_models, prompts):
    fast, _ = offline_models
    assert helpers.generate_batch(fast, prompts[:2], 0, 1024) == [[], []]
    assert helpers.generate_batch(fast, [], 5, 1024) == []
    with pytest.raises(ValueError, match="empty"):
        helpers.generate_batch(fast, [prompts[0], []], 5, 1024)
    with pytest.raises(ValueError, match="batch_size"):
        helpers.generate_batch(fast, prompts, 5, 1024, batch_size=0)


def test_fast_generation_needs_a_gpt_model(prompts):
    other = torch.nn.Linear(3, 3)
    with pytest.raises(TypeError, match="helpers.generate"):
        helpers.generate_fast(other, torch.tensor([prompts[0]]), 3, 1024)
    with pytest.raises(TypeError, match="helpers.generate"):
        helpers.generate_batch(other, prompts, 3, 1024)


def test_kv_cache_refuses_overflow():
    cfg = helpers.model_config("offline")
    model = helpers.GPTModel(cfg).eval()
    cache = helpers.KVCache(cfg["n_layers"], max_len=4)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        assert cache.length == 3
        with pytest.raises(ValueError, match="holds 4 tokens"):
            model(torch.tensor([[4, 5]]), cache=cache)


def test_bf16_autocast_on_cpu(offline_models, prompts):
    fast, _ = offline_models
    inputs, targets = training_batch(mask_instructions=False)
    model = copy.deepcopy(fast).train()
    loss32 = helpers.calc_loss_batch(inputs, targets, model, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = helpers.calc_loss_batch(inputs, targets, model, "cpu")
        with torch.no_grad():
            logits = model(inputs)
    assert logits.dtype == torch.bfloat16
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    loss16.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = helpers.generate_fast(model, torch.tensor([prompts[0]]), 5, 1024)
        batched = helpers.generate_batch(model, prompts[:3], 5, 1024)
    assert cached.shape == (1, len(prompts[0]) + 5)
    assert [len(tokens) for tokens in batched] == [5, 5, 5]
    assert all(0 <= t < 50257 for tokens in batched for t in tokens)


def test_bf16_autocast_with_a_packed_batch():
    torch.manual_seed(2)
    cfg = {**helpers.model_config("offline"), "emb_dim": 768, "n_heads": 12}
    model = helpers.GPTModel(cfg)
    inputs, targets = training_batch(mask_instructions=True)
    assert helpers.pack_batch(inputs, targets, 768) is not None
    loss32 = helpers.calc_loss_batch(inputs, targets, model, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = helpers.calc_loss_batch(inputs, targets, model, "cpu")
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    loss16.backward()
    assert model.trf_blocks[0].att.W_query.weight.grad.abs().sum() > 0


def test_make_optimizer_is_adamw_with_the_same_steps():
    torch.manual_seed(3)
    cfg = helpers.model_config("offline")
    model_a = helpers.GPTModel(cfg)
    model_b = copy.deepcopy(model_a)
    start = model_a.out_head.weight.detach().clone()
    opt_a = helpers.make_optimizer(model_a, lr=5e-3, weight_decay=0.1)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=5e-3, weight_decay=0.1)
    assert isinstance(opt_a, torch.optim.AdamW)
    assert opt_a.defaults["lr"] == 5e-3 and opt_a.defaults["weight_decay"] == 0.1
    if helpers.torch_version_at_least(torch.__version__, (2, 4)):
        assert opt_a.defaults["fused"]  # the CPU has a fused AdamW since PyTorch 2.4
    # the same gradients into both: real ones first, then random ones
    inputs, targets = training_batch(mask_instructions=False)
    helpers.calc_loss_batch(inputs, targets, model_a, "cpu").backward()
    grads = [[p.grad.clone() for p in model_a.parameters()]]
    grads += [[torch.randn_like(p) for p in model_a.parameters()] for _ in range(2)]
    for step_grads in grads:
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            for p, g in zip(model.parameters(), step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
    params_b = dict(model_b.named_parameters())
    for name, p in model_a.named_parameters():
        assert torch.allclose(p, params_b[name], atol=1e-6), name
    assert (model_a.out_head.weight - start).abs().max() > 1e-3  # the steps did move it


def test_training_sample_uses_the_fast_path_with_the_same_text(tiny_models, capsys):
    fast, plain = tiny_models
    tokenizer = helpers.get_tokenizer()
    start_context = "Below is an instruction that describes a task."
    text = helpers.generate_and_print_sample(fast, tokenizer, "cpu", start_context)
    want = helpers.token_ids_to_text(
        helpers.generate(plain, helpers.text_to_token_ids(start_context, tokenizer), 50, 1024),
        tokenizer,
    )
    assert text == want and len(text) > len(start_context)
    assert capsys.readouterr().out.strip() == want.replace("\n", " ").strip()
    assert fast.training  # generate_and_print_sample switches back to training mode
    fast.eval()


def test_pack_batch_keeps_each_row_up_to_its_last_counted_target():
    pad, ignore = 50256, -100
    inputs = torch.tensor([[5, 6, 7, pad, pad], [8, 9, pad, pad, pad], [1, 2, 3, 4, 5]])
    targets = torch.tensor(
        [[6, 7, pad, ignore, ignore], [ignore, pad, ignore, ignore, ignore], [2, 3, 4, 5, pad]]
    )
    ids, positions, attn_mask, packed_targets = helpers.pack_batch(inputs, targets, emb_dim=64)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4, 5]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]
    assert packed_targets.tolist() == [[6, 7, pad, ignore, pad, 2, 3, 4, 5, pad]]
    assert attn_mask.shape == (1, 1, 10, 10)
    # token 4 (row 2, position 1) sees tokens 3 and 4 of its own row, nothing else
    assert attn_mask[0, 0, 4].nonzero().flatten().tolist() == [3, 4]
    assert attn_mask[0, 0, 9].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    # nothing to drop, or nothing counted: the batch stays as it is
    full = torch.tensor([[2, 3, 4, 5, pad]] * 2)
    assert helpers.pack_batch(inputs[[2, 2]], full, emb_dim=64) is None
    assert helpers.pack_batch(inputs, torch.full_like(targets, ignore), emb_dim=64) is None


def test_pack_batch_keeps_long_rows_apart_when_attention_would_cost_more():
    """Two long rows with little padding: one long sequence would cost more attention
    than the dropped padding saves."""
    inputs = torch.zeros((2, 1000), dtype=torch.long)
    targets = torch.zeros((2, 1000), dtype=torch.long)
    targets[:, 900:] = -100
    assert helpers.pack_batch(inputs, targets, emb_dim=64) is None
    assert helpers.pack_batch(inputs, targets, emb_dim=4096) is not None


def test_fast_blocks_share_one_causal_mask_and_save_like_the_book(tmp_path):
    cfg = helpers.model_config("offline")
    fast, plain = helpers.GPTModel(cfg), helpers.GPTModel({**cfg, "fast": False})
    masks = [block.att.mask for block in fast.trf_blocks]
    assert all(m.data_ptr() == masks[0].data_ptr() for m in masks)
    assert plain.trf_blocks[0].att.mask.data_ptr() != plain.trf_blocks[1].att.mask.data_ptr()
    book_mask = torch.triu(torch.ones(1024, 1024), diagonal=1)
    assert torch.equal(masks[0], book_mask)
    assert torch.equal(plain.trf_blocks[1].att.mask, book_mask)
    # a .pth of the fast model loads into the plain one and back, masks included
    torch.save(fast.state_dict(), tmp_path / "fast.pth")
    plain.load_state_dict(torch.load(tmp_path / "fast.pth"), strict=True)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    fast.load_state_dict(torch.load(tmp_path / "plain.pth"), strict=True)
    assert torch.equal(fast.trf_blocks[1].att.mask, book_mask)
    assert torch.equal(fast.tok_emb.weight, plain.tok_emb.weight)
