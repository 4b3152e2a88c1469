"""The second source of GPT-2 weights: Hugging Face's safetensors files.

The offline model is written in both forms (OpenAI's TensorFlow checkpoint and
Hugging Face's model.safetensors) from the same random arrays, so both loaders must
give the very same parameters. The fallback from TensorFlow to safetensors is
tested with TensorFlow made unimportable and with OpenAI's hosts answering errors
from a real HTTP server on the loopback interface.
"""

from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gpt2_fixtures import offline_gpt2_files  # noqa: F401
from http_fixtures import FileServer, closed_port_url, no_proxy  # noqa: F401
from safetensors.numpy import load_file, save_file

import helpers
from course.gpt2_files import (
    SAFETENSORS_FILES,
    load_gpt2_from_safetensors,
    load_gpt2_params_from_tf_ckpt,
    tf_checkpoint_path,
)
from course.offline_model import offline_gpt2_arrays, write_offline_gpt2, write_tf_checkpoint
from course.settings import model_config
from course.weights import load_gpt2

OFFLINE_SETTINGS = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 64, "n_head": 2, "n_layer": 2}


def flatten(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{"blocks/0/attn/c_attn/w": array, "wte": array, ...} from the nested params."""
    flat = {}
    for key, value in params.items():
        if key == "blocks":
            for i, block in enumerate(value):
                flat.update(flatten(block, f"{prefix}blocks/{i}/"))
        elif isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value
    return flat


def assert_same_params(a: dict, b: dict) -> None:
    flat_a, flat_b = flatten(a), flatten(b)
    assert sorted(flat_a) == sorted(flat_b)
    for name in flat_a:
        assert flat_a[name].dtype == flat_b[name].dtype == np.float32, name
        assert flat_a[name].shape == flat_b[name].shape, name
        np.testing.assert_array_equal(flat_a[name], flat_b[name], err_msg=name)


@pytest.fixture
def tf_offline(tmp_path, offline_gpt2_files, capsys):  # noqa: F811
    """(settings, params, printed text) of the TF loader on the offline checkpoint."""
    models_dir = tmp_path / "tf"
    for name, data in offline_gpt2_files.items():
        (models_dir / "offline").mkdir(parents=True, exist_ok=True)
        (models_dir / "offline" / name).write_bytes(data)
    settings, params = load_gpt2("offline", models_dir, source="tensorflow")
    return settings, params, capsys.readouterr().out


@pytest.fixture(scope="module")
def offline_safetensors(tmp_path_factory) -> dict[str, bytes]:
    """{file name: bytes} of the offline model in Hugging Face's form."""
    model_dir = tmp_path_factory.mktemp("st") / "offline"
    write_offline_gpt2(model_dir, fmt="safetensors")
    return {name: (model_dir / name).read_bytes() for name in SAFETENSORS_FILES}


def hide_tensorflow(monkeypatch, how: str) -> None:
    """Make `import tensorflow` fail the way it does on a machine without it."""
    if how == "missing":
        monkeypatch.setitem(sys.modules, "tensorflow", None)  # import raises ImportError
        return
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tensorflow" or name.startswith("tensorflow."):
            if how == "no_module":
                raise ModuleNotFoundError("No module named 'tensorflow'")
            raise AttributeError("_ARRAY_API not found")  # a broken install
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


# --- both formats hold the same weights ---------------------------------------------


def test_offline_model_in_both_formats_loads_identically(tmp_path, tf_offline, capsys):
    tf_settings, tf_params, tf_out = tf_offline
    assert "from OpenAI's TensorFlow checkpoint (source: tensorflow)" in tf_out
    st_settings, st_params = load_gpt2("offline", tmp_path / "st", source="safetensors")
    out = capsys.readouterr().out
    assert "(source: safetensors)" in out and "tensorflow" not in out.lower()
    assert sorted(p.name for p in (tmp_path / "st" / "offline").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert tf_settings == st_settings == OFFLINE_SETTINGS
    assert_same_params(tf_params, st_params)
    assert len(flatten(st_params)) == 4 + 12 * 2

    # the two GPTModels, started from different random weights, end up identical
    cfg = model_config("offline")
    torch.manual_seed(1)
    model_tf = helpers.GPTModel(cfg)
    torch.manual_seed(2)
    model_st = helpers.GPTModel(cfg)
    untouched = {k: v.clone() for k, v in model_st.state_dict().items()}
    helpers.load_weights_into_gpt(model_tf, tf_params)
    helpers.load_weights_into_gpt(model_st, st_params)
    state_tf, state_st = model_tf.state_dict(), model_st.state_dict()
    assert state_tf.keys() == state_st.keys()
    for name in state_tf:
        assert torch.equal(state_tf[name], state_st[name]), name
        # the causal mask is no weight; the norms start as ones and zeros either way
        if not name.endswith(".mask") and "norm" not in name:
            assert not torch.equal(state_st[name], untouched[name]), f"{name} was not loaded"
    assert torch.equal(model_st.out_head.weight, model_st.tok_emb.weight)
    np.testing.assert_array_equal(
        model_st.tok_emb.weight.detach().numpy(),
        offline_gpt2_arrays()[0]["model/wte"],
    )
    tokens = torch.tensor([[15496, 11, 995, 13]])
    with torch.no_grad():
        assert torch.equal(model_tf(tokens), model_st(tokens))


def test_safetensors_file_uses_hugging_face_names_and_layout(offline_safetensors, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(offline_safetensors["model.safetensors"])
    tensors = load_file(str(path))
    block_names = [
        "ln_1.weight",
        "ln_1.bias",
        "attn.c_attn.weight",
        "attn.c_attn.bias",
        "attn.c_proj.weight",
        "attn.c_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ]
    expected = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    expected |= {f"h.{i}.{n}" for i in range(2) for n in block_names}
    assert set(tensors) == expected
    # Conv1D weights are [in, out], as in GPT2LMHeadModel's state dict
    assert tensors["wte.weight"].shape == (50257, 64)
    assert tensors["wpe.weight"].shape == (1024, 64)
    assert tensors["h.1.attn.c_attn.weight"].shape == (64, 192)
    assert tensors["h.1.attn.c_attn.bias"].shape == (192,)
    assert tensors["h.1.attn.c_proj.weight"].shape == (64, 64)
    assert tensors["h.1.mlp.c_fc.weight"].shape == (64, 256)
    assert tensors["h.1.mlp.c_proj.weight"].shape == (256, 64)
    assert all(t.dtype == np.float32 for t in tensors.values())
    config = json.loads(offline_safetensors["config.json"])
    assert config["model_type"] == "gpt2"
    assert {k: config[k] for k in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")} == {
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 64,
        "n_head": 2,
        "n_layer": 2,
    }


def hf_name_to_openai(name: str) -> str:
    """This test's own rule: "h.3.ln_1.weight" -> "model/h3/ln_1/g" (OpenAI's names)."""
    *path, kind = name.split(".")
    if path[0] == "h":
        path = [f"h{path[1]}", *path[2:]]
    if path in (["wte"], ["wpe"]):
        return f"model/{path[0]}"
    leaf = (
        {"weight": "g", "bias": "b"} if path[-1].startswith("ln_") else {"weight": "w", "bias": "b"}
    )
    return "/".join(["model", *path, leaf[kind]])


def test_both_loaders_agree_on_every_tensor_with_distinct_values(tmp_path):
    """Every tensor holds different numbers, so a swapped name cannot go unnoticed."""
    rng = np.random.default_rng(0)
    d, vocab, ctx, n_layer = 8, 16, 8, 2
    shapes = {
        "wte.weight": (vocab, d),
        "wpe.weight": (ctx, d),
        "ln_f.weight": (d,),
        "ln_f.bias": (d,),
    }
    for i in range(n_layer):
        for name, shape in {
            "ln_1.weight": (d,),
            "ln_1.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d),
            "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d),
            "attn.c_proj.bias": (d,),
            "ln_2.weight": (d,),
            "ln_2.bias": (d,),
            "mlp.c_fc.weight": (d, 4 * d),
            "mlp.c_fc.bias": (4 * d,),
            "mlp.c_proj.weight": (4 * d, d),
            "mlp.c_proj.bias": (d,),
        }.items():
            shapes[f"h.{i}.{name}"] = shape
    hf = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    # OpenAI's checkpoint stores the Conv1D weights with a leading axis of 1
    openai = {
        hf_name_to_openai(n): a[None] if a.ndim == 2 and n.startswith("h.") else a
        for n, a in hf.items()
    }
    hparams = {"n_vocab": vocab, "n_ctx": ctx, "n_embd": d, "n_head": 2, "n_layer": n_layer}
    write_tf_checkpoint(tmp_path / "tf", openai, hparams)
    tf_params = load_gpt2_params_from_tf_ckpt(tf_checkpoint_path(tmp_path / "tf"), hparams)
    (tmp_path / "st").mkdir()
    save_file(hf, str(tmp_path / "st" / "model.safetensors"))
    config = {"vocab_size": vocab, "n_positions": ctx, "n_embd": d, "n_head": 2, "n_layer": n_layer}
    (tmp_path / "st" / "config.json").write_text(json.dumps(config))
    settings, st_params = load_gpt2_from_safetensors(tmp_path / "st")
    assert settings == hparams
    assert_same_params(tf_params, st_params)
    assert len(flatten(st_params)) == len(hf) == 4 + 12 * n_layer


def test_writer_keeps_existing_files(tmp_path):
    model_dir = write_offline_gpt2(tmp_path / "offline", fmt="safetensors")
    before = {n: (model_dir / n).stat().st_mtime_ns for n in SAFETENSORS_FILES}
    write_offline_gpt2(model_dir, fmt="safetensors")
    assert {n: (model_dir / n).stat().st_mtime_ns for n in SAFETENSORS_FILES} == before
    with pytest.raises(ValueError, match="safetensors"):
        write_offline_gpt2(tmp_path / "x", fmt="pickle")


def test_loader_accepts_prefixed_names_and_skips_buffers(tmp_path, offline_safetensors):
    """Some files prefix "transformer." and carry the mask buffers and lm_head."""
    reference = tmp_path / "ref"
    reference.mkdir()
    for name, data in offline_safetensors.items():
        (reference / name).write_bytes(data)
    _, expected = load_gpt2_from_safetensors(reference)

    tensors = load_file(str(reference / "model.safetensors"))
    variant = {f"transformer.{k}": v for k, v in tensors.items()}
    for i in range(2):
        mask = np.tril(np.ones((1024, 1024), np.float32)).reshape(1, 1, 1024, 1024)
        variant[f"transformer.h.{i}.attn.bias"] = mask
        variant[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    variant["lm_head.weight"] = tensors["wte.weight"]
    model_dir = tmp_path / "variant"
    model_dir.mkdir()
    save_file(variant, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_bytes(offline_safetensors["config.json"])
    settings, params = load_gpt2_from_safetensors(model_dir)
    assert settings == OFFLINE_SETTINGS
    assert_same_params(expected, params)


def write_variant(tmp_path, offline_safetensors, change) -> Path:
    model_dir = tmp_path / "changed"
    model_dir.mkdir()
    path = tmp_path / "source.safetensors"
    path.write_bytes(offline_safetensors["model.safetensors"])
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_bytes(offline_safetensors["config.json"])
    return model_dir


def test_loader_rejects_a_missing_tensor(tmp_path, offline_safetensors):
    model_dir = write_variant(tmp_path, offline_safetensors, lambda t: t.pop("h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"lacks 1 of the 28 .*h\.1\.mlp\.c_fc\.bias.*delete"):
        load_gpt2_from_safetensors(model_dir)


def test_loader_rejects_a_foreign_tensor(tmp_path, offline_safetensors):
    def add_third_layer(tensors):
        tensors["h.2.ln_1.weight"] = np.ones(64, np.float32)

    model_dir = write_variant(tmp_path, offline_safetensors, add_third_layer)
    with pytest.raises(ValueError, match=r"'h\.2\.ln_1\.weight'.*2-layer GPT-2"):
        load_gpt2_from_safetensors(model_dir)


def test_loader_rejects_a_truncated_file(tmp_path, offline_safetensors):
    model_dir = tmp_path / "offline"
    model_dir.mkdir()
    (model_dir / "config.json").write_bytes(offline_safetensors["config.json"])
    data = offline_safetensors["model.safetensors"]
    (model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="incomplete or corrupted: delete it"):
        load_gpt2_from_safetensors(model_dir)


def test_unknown_source(tmp_path):
    with pytest.raises(ValueError, match='"auto", "tensorflow" or "safetensors"'):
        load_gpt2("offline", tmp_path, source="pytorch")


# --- falling back when TensorFlow cannot be imported --------------------------------


@pytest.mark.parametrize("how", ["missing", "no_module", "broken"])
def test_fallback_when_tensorflow_cannot_be_imported(
    tmp_path, tf_offline, monkeypatch, capsys, how
):
    _, tf_params, _ = tf_offline
    hide_tensorflow(monkeypatch, how)
    settings, params = load_gpt2("offline", tmp_path / "models")
    out = capsys.readouterr().out
    assert "TensorFlow cannot be imported" in out
    assert "(source: safetensors)" in out and "(source: tensorflow)" not in out
    # only the safetensors form was written: nothing needed TensorFlow
    written = sorted(p.name for p in (tmp_path / "models" / "offline").iterdir())
    assert written == ["config.json", "model.safetensors"]
    assert settings == OFFLINE_SETTINGS
    assert_same_params(tf_params, params)


def test_source_tensorflow_without_tensorflow_says_what_to_do(tmp_path, monkeypatch):
    hide_tensorflow(monkeypatch, "missing")
    with pytest.raises(ImportError) as info:
        load_gpt2("offline", tmp_path, source="tensorflow")
    message = str(info.value)
    assert "pip install tensorflow" in message and 'source="safetensors"' in message
    assert not (tmp_path / "offline").exists()


# --- falling back when OpenAI's hosts fail ------------------------------------------


def test_fallback_when_openai_hosts_fail(
    tmp_path,
    tf_offline,
    offline_safetensors,
    capsys,
    no_proxy,  # noqa: F811
):
    _, tf_params, _ = tf_offline
    hf_files = {f"/gpt2/resolve/main/{n}": data for n, data in offline_safetensors.items()}
    with (
        FileServer({}, fail_status=503) as openai,
        FileServer({}, fail_status=500) as backup,
        FileServer(hf_files) as hugging_face,
    ):
        settings, params = load_gpt2(
            "124M",
            tmp_path,
            base_url=openai.url + "/models",
            backup_base_url=backup.url + "/gpt2",
            safetensors_base_url=hugging_face.url,
        )
        # OpenAI's host first, then its backup, then Hugging Face
        assert openai.requests and openai.requests[0]["path"].startswith("/models/124M/")
        assert backup.requests and backup.requests[0]["path"].startswith("/gpt2/124M/")
        assert sorted(r["path"] for r in hugging_face.requests) == sorted(hf_files)
    out = capsys.readouterr().out
    assert "OpenAI's host and its backup failed" in out
    assert "HTTP 503" in out and "HTTP 500" in out
    assert "(source: safetensors)" in out and "(source: tensorflow)" not in out
    assert "Loaded GPT-2 124M" in out
    assert settings == OFFLINE_SETTINGS  # the served config.json's
    assert_same_params(tf_params, params)
    for name in SAFETENSORS_FILES:
        assert (tmp_path / "124M" / name).read_bytes() == offline_safetensors[name]


def test_no_fallback_when_tensorflow_is_forced(tmp_path, no_proxy):  # noqa: F811
    with FileServer({}, fail_status=503) as openai, FileServer({}) as hugging_face:
        with pytest.raises(ConnectionError) as info:
            load_gpt2(
                "124M",
                tmp_path,
                base_url=openai.url,
                backup_base_url=openai.url,
                source="tensorflow",
                safetensors_base_url=hugging_face.url,
            )
        assert hugging_face.requests == []
    message = str(info.value)
    assert "HTTP 503" in message and 'source="safetensors"' in message


def test_both_sources_failing_is_explained(tmp_path, capsys, no_proxy):  # noqa: F811
    dead = closed_port_url()
    with FileServer({}, fail_status=404) as openai:
        with pytest.raises(ConnectionError) as info:
            load_gpt2(
                "355M",
                tmp_path,
                base_url=openai.url,
                backup_base_url=openai.url,
                safetensors_base_url=dead,
            )
    message = str(info.value)
    assert f"{dead}/gpt2-medium" in message  # the Hugging Face repository it tried
    assert "HTTP 404" in message  # what OpenAI's host said
    assert "config.json and model.safetensors" in message and "offline model" in message
    assert "(source:" not in capsys.readouterr().out
