"""The fast paths of course.speed compute what the book's code computes, on its model.

Every test runs `course.speed` on a `helpers.GPTModel` exactly as the book builds it,
and compares with the book's own functions on that same model: `forward` with
`model(x)`, `calc_loss_batch_fast` with `helpers.calc_loss_batch` (losses and
gradients within fp32 rounding), `generate_fast` and `generate_batch` with
`helpers.generate` (the same greedy tokens), the fused AdamW with PyTorch's plain
AdamW, and bf16 autocast on the CPU. The fast paths leave the model as it was.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from gpt2_fixtures import offline_gpt2_files  # noqa: F401

import helpers
from course import speed, training, weights
from course.data import DATA_FILE
from course.hardware import torch_version_at_least
from course.settings import model_config

EOS = 50256


def state_of(model: torch.nn.Module) -> dict:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    """The model still is the book's GPTModel with the very same tensors."""
    assert type(model) is helpers.GPTModel
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


@pytest.fixture(scope="module")
def offline_model(offline_gpt2_files, tmp_path_factory):  # noqa: F811
    """The offline checkpoint loaded with the book's code, as notebook 04 loads GPT-2."""
    model_dir = tmp_path_factory.mktemp("offline")
    for name, data in offline_gpt2_files.items():
        (model_dir / name).write_bytes(data)
    settings = json.loads((model_dir / "hparams.json").read_text())
    params = helpers.load_gpt2_params_from_tf_ckpt(weights.tf_checkpoint_path(model_dir), settings)
    model = helpers.GPTModel(model_config("offline"))
    helpers.load_weights_into_gpt(model, params)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_model():
    """The offline model's shape with PyTorch's default random initialisation. Unlike
    the offline checkpoint, whose greedy output repeats one token, it produces varied
    tokens, so that stopping at eos_id happens at different steps."""
    torch.manual_seed(123)
    return helpers.GPTModel(model_config("offline")).eval()


@pytest.fixture(params=["offline", "tiny"])
def model(request, offline_model, tiny_model):
    return offline_model if request.param == "offline" else tiny_model


@pytest.fixture(scope="module")
def small_model():
    """A gpt2-small sized model with random weights."""
    torch.manual_seed(7)
    return helpers.GPTModel(model_config("gpt2-small")).eval()


@pytest.fixture(scope="module")
def prompts():
    """Real course prompts of different lengths (test entries, Alpaca format)."""
    tokenizer = helpers.get_tokenizer()
    data = json.loads(DATA_FILE.read_text(encoding="utf-8"))
    test_data = helpers.split_data(data)[2]
    texts = [helpers.format_input(entry) for entry in test_data[:6]]
    texts += ["Hello", "Every effort moves you"]
    return [tokenizer.encode(text) for text in texts]


_BOOK_TOKENS: dict = {}


def book_new_tokens(model, prompt, max_new_tokens, context_size, eos_id=None):
    """The new tokens of the book's `generate` for one prompt. Remembered per model
    (the module's models never change: the tests check that the fast paths leave them
    as they were), because the book's generate reruns the whole text for every token."""
    key = (id(model), tuple(prompt), max_new_tokens, context_size, eos_id)
    if key not in _BOOK_TOKENS:
        out = helpers.generate(
            model, torch.tensor([prompt]), max_new_tokens, context_size, eos_id=eos_id
        )
        _BOOK_TOKENS[key] = out[0, len(prompt) :].tolist()
    return list(_BOOK_TOKENS[key])


def training_batch(mask_instructions: bool):
    tokenizer = helpers.get_tokenizer()
    data = json.loads(DATA_FILE.read_text(encoding="utf-8"))
    dataset = helpers.InstructionDataset(data[:8], tokenizer, with_instruction_length=True)
    batch = [dataset[i] for i in range(8)]
    return helpers.custom_collate_fn(batch, mask_instructions=mask_instructions)


# --- the forward pass --------------------------------------------------------


@pytest.mark.parametrize("which", ["offline", "small"])
def test_forward_equals_the_books_model(which, offline_model, small_model):
    model = offline_model if which == "offline" else small_model
    before = state_of(model)
    torch.manual_seed(0)
    x = torch.randint(0, 50257, (2, 37))
    with torch.no_grad():
        fast, book = speed.forward(model, x), model(x)
        hidden = speed.forward(model, x, return_hidden=True)
    assert fast.shape == book.shape == (2, 37, 50257)
    assert torch.allclose(fast, book, atol=1e-4, rtol=1e-4), (fast - book).abs().max()
    assert hidden.shape == (2, 37, model.tok_emb.embedding_dim)
    assert torch.allclose(model.out_head(hidden), fast, atol=1e-5)
    assert_unchanged(model, before)


def test_fused_layer_norm_and_gelu_equal_the_books():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 3
    norm = helpers.LayerNorm(16)
    with torch.no_grad():
        norm.scale.copy_(torch.rand(16) + 0.5)
        norm.shift.copy_(torch.randn(16))
    assert torch.allclose(speed._layer_norm(norm, x), norm(x), atol=1e-5)
    assert torch.allclose(F.gelu(x, approximate="tanh"), helpers.GELU()(x), atol=1e-5)


def test_forward_with_positions_and_mask_equals_separate_rows(tiny_model):
    """Two rows side by side in one sequence, each seeing only itself: the same logits
    as running each row alone (what the packed loss relies on)."""
    a, b = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11]])
    ids = torch.cat([a, b], dim=1)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    rows = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    mask = (rows[:, None] == rows[None, :]) & (positions[0][None, :] <= positions[0][:, None])
    with torch.no_grad():
        packed = speed.forward(tiny_model, ids, positions=positions, attn_mask=mask[None, None])
        want = torch.cat([tiny_model(a), tiny_model(b)], dim=1)
    assert torch.allclose(packed, want, atol=1e-5)


def test_state_dict_of_the_books_model_loads_back(tmp_path, tiny_model, prompts):
    """A .pth of the book's code (torch.save of the state_dict, `mask` buffers
    included) loads strictly into a new GPTModel, and the fast paths run on it."""
    path = tmp_path / "book-sft.pth"
    torch.save(tiny_model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert sum(k.endswith(".att.mask") for k in state) == len(tiny_model.trf_blocks)
    assert torch.equal(state["trf_blocks.1.att.mask"], torch.triu(torch.ones(1024, 1024), 1))
    loaded = helpers.GPTModel(model_config("offline"))
    loaded.load_state_dict(state, strict=True)
    loaded.eval()
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    prompt = prompts[0]
    got = speed.generate_fast(loaded, torch.tensor([prompt]), 6, 1024)[0, len(prompt) :]
    assert got.tolist() == book_new_tokens(tiny_model, prompt, 6, 1024)


# --- the loss and its gradients ------------------------------------------------


def loss_and_grads(loss_fn, inputs, targets, model):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(inputs, targets, model, "cpu")
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("mask_instructions", [False, True])
@pytest.mark.parametrize("width", [64, 768])
def test_fast_loss_and_gradients_equal_the_books(mask_instructions, width):
    """Width 64 (the offline model) keeps the batch as it is, width 768 (GPT-2 small's,
    two blocks) packs it: both give the book's loss and gradients on the same model."""
    torch.manual_seed(1)
    cfg = {**model_config("offline"), "emb_dim": width, "n_heads": width // 64}
    model = helpers.GPTModel(cfg).train()
    before = state_of(model)
    inputs, targets = training_batch(mask_instructions)
    assert int((targets == -100).sum()) > 0  # the fast path has positions to skip
    assert (speed.pack_batch(inputs, targets, width) is not None) == (width == 768)
    loss_book, grads_book = loss_and_grads(helpers.calc_loss_batch, inputs, targets, model)
    loss_fast, grads_fast = loss_and_grads(speed.calc_loss_batch_fast, inputs, targets, model)
    # the book's loss is the mean over the counted targets
    with torch.no_grad():
        by_hand = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    assert abs(loss_book - by_hand.item()) < 1e-6
    assert abs(loss_fast - loss_book) < 1e-5
    for name, grad in grads_book.items():
        assert torch.allclose(grads_fast[name], grad, atol=1e-6, rtol=1e-4), name
    assert_unchanged(model, before)


def test_loss_of_a_batch_with_nothing_counted_is_nan_in_both(tiny_model):
    inputs = torch.tensor([[1, 2, 3]])
    targets = torch.full((1, 3), -100)
    assert torch.isnan(speed.calc_loss_batch_fast(inputs, targets, tiny_model, "cpu"))
    assert torch.isnan(helpers.calc_loss_batch(inputs, targets, tiny_model, "cpu"))


def test_loss_loader_and_evaluation_equal_the_books(tiny_model):
    from functools import partial

    from torch.utils.data import DataLoader

    tokenizer = helpers.get_tokenizer()
    data = json.loads(DATA_FILE.read_text(encoding="utf-8"))[:12]
    dataset = helpers.InstructionDataset(data, tokenizer)
    loader = DataLoader(dataset, batch_size=4, collate_fn=partial(helpers.custom_collate_fn))
    for num_batches in (None, 2):
        book = helpers.calc_loss_loader(loader, tiny_model, "cpu", num_batches)
        fast = speed.calc_loss_loader_fast(loader, tiny_model, "cpu", num_batches)
        assert fast == pytest.approx(book, abs=1e-5)
    assert speed.evaluate_model_fast(tiny_model, loader, loader, "cpu", 2) == pytest.approx(
        helpers.evaluate_model(tiny_model, loader, loader, "cpu", 2), abs=1e-5
    )
    tiny_model.eval()  # (evaluate_model switches to training mode at the end)
    empty = DataLoader(dataset, batch_size=20, drop_last=True)
    assert speed.calc_loss_loader_fast(empty, tiny_model, "cpu") != 0  # nan, like the book's


# --- generation ------------------------------------------------------------------


@pytest.mark.parametrize("max_new_tokens", [1, 7, 20])
def test_generate_fast_equals_generate(model, prompts, max_new_tokens):
    before = state_of(model)
    for prompt in prompts:
        want = book_new_tokens(model, prompt, max_new_tokens, 1024)
        got = speed.generate_fast(model, torch.tensor([prompt]), max_new_tokens, 1024)
        assert got[0, : len(prompt)].tolist() == prompt
        assert got[0, len(prompt) :].tolist() == want
    assert_unchanged(model, before)


def eos_candidates(model, prompts, n=20):
    """Token ids the model does produce (at steps 0, 4 and 9 of three prompts), and
    GPT-2's own end of text: as eos_id they make rows stop at different steps."""
    outputs = [book_new_tokens(model, prompts[i], n, 1024) for i in (0, 1, 6)]
    return [outputs[0][4], outputs[1][0], outputs[2][9], EOS]


def test_generate_fast_stops_at_eos(tiny_model, prompts):
    lengths = set()
    for eos_id in eos_candidates(tiny_model, prompts):
        for prompt in prompts:
            want = book_new_tokens(tiny_model, prompt, 20, 1024, eos_id=eos_id)
            got = speed.generate_fast(tiny_model, torch.tensor([prompt]), 20, 1024, eos_id=eos_id)
            assert got[0, len(prompt) :].tolist() == want
            lengths.add(len(want))
    assert {0, 4, 9, 20} <= lengths  # stopped at once, later, and not at all


def test_generate_fast_sliding_window(model, prompts):
    """Beyond context_size the window slides: the cache must give way to recomputing."""
    for prompt, context_size in ((prompts[6], 5), (prompts[7], 8), (prompts[0], 30)):
        want = helpers.generate(model, torch.tensor([prompt]), 15, context_size)
        got = speed.generate_fast(model, torch.tensor([prompt]), 15, context_size)
        assert got.tolist() == want.tolist()


def test_generate_fast_samples_like_generate(model, prompts):
    for seed in (1, 2):
        torch.manual_seed(seed)
        want = helpers.generate(
            model, torch.tensor([prompts[0]]), 10, 1024, temperature=1.4, top_k=20
        )
        torch.manual_seed(seed)
        got = speed.generate_fast(
            model, torch.tensor([prompts[0]]), 10, 1024, temperature=1.4, top_k=20
        )
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_generate_batch_equals_generate_alone(model, prompts, batch_size):
    before = state_of(model)
    got = speed.generate_batch(model, prompts, 20, 1024, batch_size=batch_size)
    assert len(got) == len(prompts)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == book_new_tokens(model, prompt, 20, 1024)
    assert_unchanged(model, before)


@pytest.mark.parametrize("batch_size", [3, 8])
def test_generate_batch_stops_each_row_at_its_eos(tiny_model, prompts, batch_size):
    lengths = set()
    for eos_id in eos_candidates(tiny_model, prompts):
        got = speed.generate_batch(
            tiny_model, prompts, 20, 1024, eos_id=eos_id, batch_size=batch_size
        )
        for prompt, tokens in zip(prompts, got, strict=True):
            assert tokens == book_new_tokens(tiny_model, prompt, 20, 1024, eos_id=eos_id)
            assert eos_id not in tokens
            lengths.add(len(tokens))
    assert {0, 4, 9, 20} <= lengths  # rows stopped at different steps, or never


def test_generate_batch_prompts_longer_than_the_context(model, prompts):
    context_size = 40
    assert any(len(p) + 9 > context_size for p in prompts)
    assert any(len(p) + 9 <= context_size for p in prompts)
    got = speed.generate_batch(model, prompts, 10, context_size)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == book_new_tokens(model, prompt, 10, context_size)


def test_gpt2_small_generation_matches(small_model, prompts):
    """GPT-2 small's width and 12 heads: the same tokens too (short prompts keep the
    book's generate, which reruns the whole text for every token, quick)."""
    some = [prompts[7], prompts[6], prompts[3][:12]]
    want = [book_new_tokens(small_model, p, 3, 1024) for p in some]
    got = [
        speed.generate_fast(small_model, torch.tensor([p]), 3, 1024)[0, len(p) :].tolist()
        for p in some
    ]
    assert got == want
    assert speed.generate_batch(small_model, some, 3, 1024, batch_size=3) == want
    eos_id = want[1][1]  # a token the model produces: that row stops after one token
    want_eos = [book_new_tokens(small_model, p, 3, 1024, eos_id=eos_id) for p in some]
    assert len(want_eos[1]) == 1
    got_eos = speed.generate_batch(small_model, some, 3, 1024, eos_id=eos_id, batch_size=3)
    assert got_eos == want_eos


def test_last_token_logits_is_the_output_layer_at_the_last_position(tiny_model):
    hidden = torch.randn(3, 5, 64)
    with torch.no_grad():
        want = tiny_model.out_head(hidden[:, -1, :])
        got = speed.last_token_logits(tiny_model, hidden)
    assert got.shape == (3, 50257)
    assert torch.allclose(got, want, atol=1e-5)


def test_linear_gives_the_layers_result_in_every_case():
    """`speed.linear` is `layer(x)`: with few rows through oneDNN (within fp32 rounding),
    otherwise the layer's own call, bit for bit, with its gradient."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 512)
    few, many = torch.randn(8, 1, 256), torch.randn(4, 40, 256)
    with torch.no_grad():
        assert torch.allclose(speed.linear(layer, few), layer(few), atol=1e-5)
        assert torch.equal(speed.linear(layer, many), layer(many))  # too many rows
        no_bias = torch.nn.Linear(256, 512, bias=False)
        assert torch.allclose(speed.linear(no_bias, few), no_bias(few), atol=1e-5)
        lora = helpers.LinearWithLoRA(copy.deepcopy(layer), rank=4, alpha=4)
        assert torch.equal(speed.linear(lora, few), lora(few))  # not a plain Linear
    out = speed.linear(layer, few)  # gradients wanted: the layer's own call
    assert out.grad_fn is not None and torch.equal(out, layer(few))


def test_generation_steps_use_onednn_on_this_cpu(monkeypatch):
    """The few-row products of a generation step run through oneDNN's linear kernel on
    x86-64 CPUs (every x86-64 build of PyTorch has it; the generation benchmark relies
    on it); other CPUs keep PyTorch's default path."""
    import platform

    monkeypatch.setattr(speed, "_onednn_linear", None)  # checked anew, as on first use
    before = torch.get_rng_state()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert speed._has_onednn_linear() == x86
    assert torch.equal(torch.get_rng_state(), before)  # the check draws no random numbers
    # (a draw would change the next epoch's shuffled order in training)
    calls = []
    real = speed._onednn_kernel

    def counting(x, weight, bias):
        calls.append(tuple(x.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(speed, "_onednn_kernel", counting)
    layer = torch.nn.Linear(64, 32)
    with torch.no_grad():
        speed.linear(layer, torch.randn(2, 1, 64))
        speed.linear(layer, torch.randn(2, 40, 64))
    assert calls == ([(2, 1, 64)] if x86 else [])
    # on an ARM CPU it is not used, even where the kernel exists
    monkeypatch.setattr(speed, "_onednn_linear", None)
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert not speed._has_onednn_linear()


def test_generate_batch_edge_cases(offline_model, prompts):
    assert speed.generate_batch(offline_model, prompts[:2], 0, 1024) == [[], []]
    assert speed.generate_batch(offline_model, [], 5, 1024) == []
    with pytest.raises(ValueError, match="empty"):
        speed.generate_batch(offline_model, [prompts[0], []], 5, 1024)
    with pytest.raises(ValueError, match="batch_size"):
        speed.generate_batch(offline_model, prompts, 5, 1024, batch_size=0)
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        speed.generate_fast(offline_model, torch.tensor(prompts[0]), 5, 1024)


def test_fast_generation_needs_a_gpt_model(prompts):
    other = torch.nn.Linear(3, 3)
    with pytest.raises(TypeError, match="helpers.generate"):
        speed.generate_fast(other, torch.tensor([prompts[0]]), 3, 1024)
    with pytest.raises(TypeError, match="helpers.generate"):
        speed.generate_batch(other, prompts, 3, 1024)


def test_kv_cache_refuses_overflow(tiny_model):
    cache = speed.KVCache(len(tiny_model.trf_blocks), max_len=4)
    with torch.no_grad():
        speed.forward(tiny_model, torch.tensor([[1, 2, 3]]), cache=cache)
        assert cache.length == 3
        with pytest.raises(ValueError, match="holds 4 tokens"):
            speed.forward(tiny_model, torch.tensor([[4, 5]]), cache=cache)


def test_kv_cache_gives_the_logits_of_the_whole_text(tiny_model):
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    cache = speed.KVCache(len(tiny_model.trf_blocks), max_len=8)
    with torch.no_grad():
        first = speed.forward(tiny_model, ids[:, :5], cache=cache)
        rest = [speed.forward(tiny_model, ids[:, i : i + 1], cache=cache) for i in (5, 6, 7)]
        whole = tiny_model(ids)
    assert torch.allclose(torch.cat([first, *rest], dim=1), whole, atol=1e-5)


def test_training_sample_prints_the_books_text(tiny_model, capsys):
    """course.training.print_sample (generate_fast) prints what the book's
    generate_and_print_sample prints."""
    tokenizer = helpers.get_tokenizer()
    start_context = "Below is an instruction that describes a task."
    helpers.generate_and_print_sample(tiny_model, tokenizer, "cpu", start_context)
    book_out = capsys.readouterr().out
    text = training.print_sample(tiny_model, tokenizer, "cpu", start_context)
    assert capsys.readouterr().out == book_out
    assert book_out.strip() == text.replace("\n", " ").strip()
    assert len(text) > len(start_context)
    assert tiny_model.training  # both switch back to training mode
    tiny_model.eval()


# --- precision and the optimizer ---------------------------------------------


def test_bf16_autocast_on_cpu(offline_model, prompts):
    inputs, targets = training_batch(mask_instructions=False)
    model = copy.deepcopy(offline_model).train()
    loss32 = speed.calc_loss_batch_fast(inputs, targets, model, "cpu")
    with speed.autocast_context("cpu", "bf16"):
        loss16 = speed.calc_loss_batch_fast(inputs, targets, model, "cpu")
        with torch.no_grad():
            logits = speed.forward(model, inputs)
    assert logits.dtype == torch.bfloat16
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    loss16.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    model.eval()
    with speed.autocast_context("cpu", "bf16"):
        cached = speed.generate_fast(model, torch.tensor([prompts[0]]), 5, 1024)
        batched = speed.generate_batch(model, prompts[:3], 5, 1024)
    assert cached.shape == (1, len(prompts[0]) + 5)
    assert [len(tokens) for tokens in batched] == [5, 5, 5]
    assert all(0 <= t < 50257 for tokens in batched for t in tokens)


def test_bf16_autocast_with_a_packed_batch():
    torch.manual_seed(2)
    model = helpers.GPTModel({**model_config("offline"), "emb_dim": 768, "n_heads": 12})
    inputs, targets = training_batch(mask_instructions=True)
    assert speed.pack_batch(inputs, targets, 768) is not None
    loss32 = helpers.calc_loss_batch(inputs, targets, model, "cpu")
    with speed.autocast_context("cpu", "bf16"):
        loss16 = speed.calc_loss_batch_fast(inputs, targets, model, "cpu")
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    loss16.backward()
    assert model.trf_blocks[0].att.W_query.weight.grad.abs().sum() > 0


def test_make_optimizer_is_adamw_with_the_same_steps():
    torch.manual_seed(3)
    model_a = helpers.GPTModel(model_config("offline"))
    model_b = copy.deepcopy(model_a)
    start = model_a.out_head.weight.detach().clone()
    opt_a = speed.make_optimizer(model_a, lr=5e-3, weight_decay=0.1)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=5e-3, weight_decay=0.1)
    assert isinstance(opt_a, torch.optim.AdamW)
    assert opt_a.defaults["lr"] == 5e-3 and opt_a.defaults["weight_decay"] == 0.1
    if torch_version_at_least(torch.__version__, (2, 4)):
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


def test_make_optimizer_takes_only_trainable_parameters():
    model = helpers.GPTModel(model_config("offline"))
    for p in model.parameters():
        p.requires_grad = False
    model.out_head.weight.requires_grad = True
    opt = speed.make_optimizer(model, lr=1e-3, weight_decay=0.0)
    assert [p for group in opt.param_groups for p in group["params"]] == [model.out_head.weight]


def test_keep_freed_memory_takes_effect_on_linux():
    import sys

    result = speed.keep_freed_memory()
    assert isinstance(result, bool)
    if sys.platform.startswith("linux"):
        import platform

        assert result == (platform.libc_ver()[0] == "glibc")


# --- the packed batch ------------------------------------------------------------


def test_pack_batch_keeps_each_row_up_to_its_last_counted_target():
    pad, ignore = 50256, -100
    inputs = torch.tensor([[5, 6, 7, pad, pad], [8, 9, pad, pad, pad], [1, 2, 3, 4, 5]])
    targets = torch.tensor(
        [[6, 7, pad, ignore, ignore], [ignore, pad, ignore, ignore, ignore], [2, 3, 4, 5, pad]]
    )
    ids, positions, attn_mask, packed_targets = speed.pack_batch(inputs, targets, emb_dim=64)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4, 5]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]
    assert packed_targets.tolist() == [[6, 7, pad, ignore, pad, 2, 3, 4, 5, pad]]
    assert attn_mask.shape == (1, 1, 10, 10)
    # token 4 (row 2, position 1) sees tokens 3 and 4 of its own row, nothing else
    assert attn_mask[0, 0, 4].nonzero().flatten().tolist() == [3, 4]
    assert attn_mask[0, 0, 9].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    # nothing to drop, or nothing counted: the batch stays as it is
    full = torch.tensor([[2, 3, 4, 5, pad]] * 2)
    assert speed.pack_batch(inputs[[2, 2]], full, emb_dim=64) is None
    assert speed.pack_batch(inputs, torch.full_like(targets, ignore), emb_dim=64) is None


def test_pack_batch_keeps_long_rows_apart_when_attention_would_cost_more():
    """Two long rows with little padding: one long sequence would cost more attention
    than the dropped padding saves."""
    inputs = torch.zeros((2, 1000), dtype=torch.long)
    targets = torch.zeros((2, 1000), dtype=torch.long)
    targets[:, 900:] = -100
    assert speed.pack_batch(inputs, targets, emb_dim=64) is None
    assert speed.pack_batch(inputs, targets, emb_dim=4096) is not None
