"""OpenAI's TensorFlow checkpoint layout -> params dicts -> GPTModel parameters."""

from __future__ import annotations

import copy
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from gpt2_fixtures import offline_gpt2_files  # noqa: F401

import helpers
from course.gpt2_files import load_gpt2_params_from_tf_ckpt, tf_checkpoint_path
from course.offline_model import write_tf_checkpoint
from course.settings import model_config
from course.weights import load_gpt2, load_weights_into_gpt

# a tiny GPT-2 in OpenAI's layout; every number distinct, so a mix-up shows
HPARAMS = {"n_vocab": 11, "n_ctx": 7, "n_embd": 6, "n_head": 2, "n_layer": 2}
CFG = {
    "vocab_size": 11,
    "context_length": 7,
    "emb_dim": 6,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


def openai_arrays(seed: int = 7) -> dict[str, np.ndarray]:
    """The variables of a GPT-2 checkpoint, named and shaped as OpenAI's are."""
    rng = np.random.default_rng(seed)
    v, c, d = HPARAMS["n_vocab"], HPARAMS["n_ctx"], HPARAMS["n_embd"]

    def rand(*shape, loc=0.0):
        return (loc + 0.4 * rng.standard_normal(shape)).astype(np.float32)

    arrays = {"model/wte": rand(v, d), "model/wpe": rand(c, d)}
    for i in range(HPARAMS["n_layer"]):
        h = f"model/h{i}"
        arrays[f"{h}/ln_1/g"] = rand(d, loc=1.0)
        arrays[f"{h}/ln_1/b"] = rand(d)
        arrays[f"{h}/attn/c_attn/w"] = rand(1, d, 3 * d)  # conv1d weights: (1, in, out)
        arrays[f"{h}/attn/c_attn/b"] = rand(3 * d)
        arrays[f"{h}/attn/c_proj/w"] = rand(1, d, d)
        arrays[f"{h}/attn/c_proj/b"] = rand(d)
        arrays[f"{h}/ln_2/g"] = rand(d, loc=1.0)
        arrays[f"{h}/ln_2/b"] = rand(d)
        arrays[f"{h}/mlp/c_fc/w"] = rand(1, d, 4 * d)
        arrays[f"{h}/mlp/c_fc/b"] = rand(4 * d)
        arrays[f"{h}/mlp/c_proj/w"] = rand(1, 4 * d, d)
        arrays[f"{h}/mlp/c_proj/b"] = rand(d)
    arrays["model/ln_f/g"] = rand(d, loc=1.0)
    arrays["model/ln_f/b"] = rand(d)
    return arrays


@pytest.fixture(scope="module")
def known_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    model_dir = tmp_path_factory.mktemp("known-values")
    arrays = openai_arrays()
    write_tf_checkpoint(model_dir, arrays, HPARAMS)
    return model_dir, arrays


@pytest.fixture(scope="module")
def known_params(known_checkpoint) -> dict:
    model_dir, _ = known_checkpoint
    settings = json.loads((model_dir / "hparams.json").read_text())
    return load_gpt2_params_from_tf_ckpt(tf_checkpoint_path(model_dir), settings)


def loaded_model(params: dict) -> helpers.GPTModel:
    """The book's GPTModel with `params` loaded by course.weights.load_weights_into_gpt:
    the book's mapping (helpers.load_weights_into_gpt) after checking every shape."""
    torch.manual_seed(0)
    model = helpers.GPTModel(CFG)
    load_weights_into_gpt(model, params)
    return model.eval()


def test_checkpoint_has_openais_files(known_checkpoint):
    model_dir, _ = known_checkpoint
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(helpers.GPT2_FILES)
    assert json.loads((model_dir / "hparams.json").read_text()) == HPARAMS
    # OpenAI's "checkpoint" index names the checkpoint by a relative path
    assert 'model_checkpoint_path: "model.ckpt"' in (model_dir / "checkpoint").read_text()


def test_params_dict_has_the_books_structure(known_checkpoint, known_params):
    _, arrays = known_checkpoint
    params = known_params
    assert sorted(params) == ["b", "blocks", "g", "wpe", "wte"]
    assert len(params["blocks"]) == 2
    np.testing.assert_array_equal(params["wte"], arrays["model/wte"])
    np.testing.assert_array_equal(params["wpe"], arrays["model/wpe"])
    np.testing.assert_array_equal(params["g"], arrays["model/ln_f/g"])
    np.testing.assert_array_equal(params["b"], arrays["model/ln_f/b"])
    for i, block in enumerate(params["blocks"]):
        assert sorted(block) == ["attn", "ln_1", "ln_2", "mlp"]
        for path in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj", "ln_1", "ln_2"):
            group, *sub = path.split("/")
            node = block[group][sub[0]] if sub else block[group]
            for leaf, value in node.items():
                # the leading 1 of the conv1d weights is squeezed away
                expected = np.squeeze(arrays[f"model/h{i}/{path}/{leaf}"])
                np.testing.assert_array_equal(value, expected)
    assert params["blocks"][1]["attn"]["c_attn"]["w"].shape == (6, 18)


def test_values_land_in_the_right_parameters(known_checkpoint, known_params):
    _, a = known_checkpoint
    model = loaded_model(known_params)
    d = HPARAMS["n_embd"]
    expected = {
        "tok_emb.weight": a["model/wte"],
        "pos_emb.weight": a["model/wpe"],
        "final_norm.scale": a["model/ln_f/g"],
        "final_norm.shift": a["model/ln_f/b"],
        "out_head.weight": a["model/wte"],  # GPT-2 ties the head to the embedding
    }
    for i in range(HPARAMS["n_layer"]):
        h, pre = f"model/h{i}", f"trf_blocks.{i}"
        w, b = a[f"{h}/attn/c_attn/w"][0], a[f"{h}/attn/c_attn/b"]
        # c_attn holds query | key | value side by side, as (in, out): transpose
        for j, name in enumerate(("W_query", "W_key", "W_value")):
            expected[f"{pre}.att.{name}.weight"] = w[:, j * d : (j + 1) * d].T
            expected[f"{pre}.att.{name}.bias"] = b[j * d : (j + 1) * d]
        expected[f"{pre}.att.out_proj.weight"] = a[f"{h}/attn/c_proj/w"][0].T
        expected[f"{pre}.att.out_proj.bias"] = a[f"{h}/attn/c_proj/b"]
        expected[f"{pre}.ff.layers.0.weight"] = a[f"{h}/mlp/c_fc/w"][0].T
        expected[f"{pre}.ff.layers.0.bias"] = a[f"{h}/mlp/c_fc/b"]
        expected[f"{pre}.ff.layers.2.weight"] = a[f"{h}/mlp/c_proj/w"][0].T
        expected[f"{pre}.ff.layers.2.bias"] = a[f"{h}/mlp/c_proj/b"]
        expected[f"{pre}.norm1.scale"] = a[f"{h}/ln_1/g"]
        expected[f"{pre}.norm1.shift"] = a[f"{h}/ln_1/b"]
        expected[f"{pre}.norm2.scale"] = a[f"{h}/ln_2/g"]
        expected[f"{pre}.norm2.shift"] = a[f"{h}/ln_2/b"]

    parameters = dict(model.named_parameters(remove_duplicate=False))
    assert set(parameters) == set(expected), "every parameter must come from the checkpoint"
    for name, value in expected.items():
        got = parameters[name].detach()
        assert got.dtype == torch.float32, name
        np.testing.assert_array_equal(got.numpy(), value, err_msg=name)
    # the causal mask is not a weight: it is left as built
    assert torch.equal(model.trf_blocks[0].att.mask, torch.triu(torch.ones(7, 7), diagonal=1))


def numpy_gpt2_logits(a: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """GPT-2's forward pass written directly on OpenAI's arrays (float64)."""
    a = {k: v.astype(np.float64) for k, v in a.items()}
    heads, n = HPARAMS["n_head"], len(ids)

    def norm(x, g, b):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return g * (x - mean) / np.sqrt(var + 1e-5) + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    x = a["model/wte"][ids] + a["model/wpe"][:n]
    future = np.triu(np.ones((n, n), dtype=bool), k=1)
    for i in range(HPARAMS["n_layer"]):
        h = f"model/h{i}"
        y = norm(x, a[f"{h}/ln_1/g"], a[f"{h}/ln_1/b"])
        qkv = y @ a[f"{h}/attn/c_attn/w"][0] + a[f"{h}/attn/c_attn/b"]
        q, k, v = (t.reshape(n, heads, -1).transpose(1, 0, 2) for t in np.split(qkv, 3, -1))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
        scores[:, future] = -np.inf
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attn = (weights @ v).transpose(1, 0, 2).reshape(n, -1)
        x = x + attn @ a[f"{h}/attn/c_proj/w"][0] + a[f"{h}/attn/c_proj/b"]
        y = norm(x, a[f"{h}/ln_2/g"], a[f"{h}/ln_2/b"])
        hidden = gelu(y @ a[f"{h}/mlp/c_fc/w"][0] + a[f"{h}/mlp/c_fc/b"])
        x = x + hidden @ a[f"{h}/mlp/c_proj/w"][0] + a[f"{h}/mlp/c_proj/b"]
    x = norm(x, a["model/ln_f/g"], a["model/ln_f/b"])
    return x @ a["model/wte"].T


def test_loaded_model_computes_gpt2(known_checkpoint, known_params):
    _, arrays = known_checkpoint
    model = loaded_model(known_params)
    ids = [3, 1, 4, 1, 5, 9, 2]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].double().numpy()
    np.testing.assert_allclose(logits, numpy_gpt2_logits(arrays, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("where", "bad_shape", "named", "model_shape", "checkpoint_shape"),
    [
        (("wte",), (10, 6), "tok_emb.weight", (11, 6), (10, 6)),
        (("wpe",), (8, 6), "pos_emb.weight", (7, 6), (8, 6)),
        # query | key | value of width 7 each, transposed
        (
            ("blocks", 0, "attn", "c_attn", "w"),
            (6, 21),
            "trf_blocks.0.att.W_query.weight",
            (6, 6),
            (7, 6),
        ),
        (("blocks", 1, "attn", "c_proj", "b"), (5,), "trf_blocks.1.att.out_proj.bias", (6,), (5,)),
        (
            ("blocks", 1, "mlp", "c_fc", "w"),
            (6, 23),
            "trf_blocks.1.ff.layers.0.weight",
            (24, 6),
            (23, 6),
        ),
        (("blocks", 0, "ln_2", "g"), (7,), "trf_blocks.0.norm2.scale", (6,), (7,)),
        (("g",), (5,), "final_norm.scale", (6,), (5,)),
    ],
)
def test_wrong_shape_names_the_tensor(
    known_params, where, bad_shape, named, model_shape, checkpoint_shape
):
    params = copy.deepcopy(known_params)
    node = params
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = np.zeros(bad_shape, np.float32)
    with pytest.raises(ValueError) as info:
        loaded_model(params)
    message = str(info.value)
    assert named in message, message
    assert f"the model has {model_shape}" in message, message
    assert f"the checkpoint has {checkpoint_shape}" in message, message


def test_wrong_number_of_blocks(known_params):
    params = copy.deepcopy(known_params)
    params["blocks"] = params["blocks"][:1]
    with pytest.raises(ValueError, match="transformer blocks"):
        loaded_model(params)


def test_checkpoint_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="hparams.json"):
        tf_checkpoint_path(tmp_path)


def test_damaged_checkpoint_is_clear(known_checkpoint, tmp_path):
    model_dir, _ = known_checkpoint
    for name in helpers.GPT2_FILES:
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    index_file = tmp_path / "model.ckpt.index"
    index_file.write_bytes(index_file.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="delete the folder"):
        load_gpt2_params_from_tf_ckpt(tf_checkpoint_path(tmp_path), HPARAMS)


# --- the offline model ------------------------------------------------------


def flatten(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in params.items():
        if key == "blocks":
            for i, block in enumerate(value):
                out.update(flatten(block, f"{prefix}h{i}/"))
        elif isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def test_offline_model_is_deterministic_and_needs_no_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the offline model must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    settings_a, params_a = load_gpt2("offline", tmp_path / "a")
    settings_b, params_b = load_gpt2("offline", tmp_path / "b")
    expected = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 64, "n_head": 2, "n_layer": 2}
    assert settings_a == expected
    assert settings_b == expected
    flat_a, flat_b = flatten(params_a), flatten(params_b)
    assert sorted(flat_a) == sorted(flat_b)
    assert len(flat_a) == 4 + 2 * 12
    for name in flat_a:
        np.testing.assert_array_equal(flat_a[name], flat_b[name], err_msg=name)
    # the same seven files, byte for byte
    for name in helpers.GPT2_FILES:
        a_bytes = (tmp_path / "a" / "offline" / name).read_bytes()
        assert a_bytes == (tmp_path / "b" / "offline" / name).read_bytes(), name
    # and they load into the offline GPTModel configuration
    model = helpers.GPTModel(model_config("offline"))
    helpers.load_weights_into_gpt(model, params_a)
    with torch.no_grad():
        logits = model(torch.tensor([[15496, 11, 995]]))
    assert logits.shape == (1, 3, 50257) and torch.isfinite(logits).all()


def test_offline_files_are_kept(tmp_path, offline_gpt2_files):  # noqa: F811
    model_dir = tmp_path / "offline"
    for name, data in offline_gpt2_files.items():
        (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / name).write_bytes(data)
    before = {name: (model_dir / name).stat().st_mtime_ns for name in helpers.GPT2_FILES}
    settings, _ = load_gpt2("offline", tmp_path)
    assert settings["n_embd"] == 64
    after = {name: (model_dir / name).stat().st_mtime_ns for name in helpers.GPT2_FILES}
    assert after == before, "existing offline files must not be rewritten"


def test_offline_tokenizer_files_are_gpt2s(offline_gpt2_files):  # noqa: F811
    root = Path(helpers.__file__).resolve().parent / "gpt2-tokenizer"
    for name in ("encoder.json", "vocab.bpe"):
        assert offline_gpt2_files[name] == (root / name).read_bytes()


def test_unknown_model_size(tmp_path):
    with pytest.raises(ValueError, match="355M"):
        load_gpt2("350M", tmp_path)
