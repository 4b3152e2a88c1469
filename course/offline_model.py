"""The offline model: a tiny GPT-2 with random weights, written on this machine in
OpenAI's seven-file layout or Hugging Face's, so the loading code runs with no network.
Used by `course.weights.load_gpt2("offline", ...)` (notebook 04, `run_course.py --offline`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import helpers
from course.artifacts import write_atomic, write_json
from course.gpt2_files import (
    GPT2_FILES,
    SAFETENSORS_BLOCK_NAMES,
    SAFETENSORS_FILES,
    DamagedCheckpoint,
    load_gpt2_from_safetensors,
    read_gpt2_tf_files,
)
from course.settings import OFFLINE_MODEL, model_config


def load_offline_gpt2(model_dir: str | Path, fmt: str = "tensorflow") -> tuple[dict, dict]:
    """Write the offline model's files if needed and read them; damaged files are rewritten.

    The offline model is made on this machine, so files cut off by an interrupted
    write or a full disk are simply written again (a real download says to delete
    the folder instead).
    """
    model_dir = Path(model_dir)

    def read():
        if fmt == "tensorflow":
            return read_gpt2_tf_files(model_dir)
        return load_gpt2_from_safetensors(model_dir)

    write_offline_gpt2(model_dir, fmt=fmt)
    try:
        return read()
    except (DamagedCheckpoint, FileNotFoundError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        print(f"The offline model's files in {model_dir} are damaged ({reason}).")
        print("Writing them anew.")
        for name in GPT2_FILES if fmt == "tensorflow" else SAFETENSORS_FILES:
            (model_dir / name).unlink(missing_ok=True)
        write_offline_gpt2(model_dir, fmt=fmt)
        return read()


def write_offline_gpt2(model_dir: str | Path, seed: int = 123, fmt: str = "tensorflow") -> Path:
    """Write a tiny GPT-2 checkpoint with random weights, as a real download would be.

    fmt="tensorflow": the same seven files as OpenAI's download, written with
    TensorFlow; fmt="safetensors": Hugging Face's config.json and model.safetensors.
    Both hold the very same weights, so loading either runs the code that loads a
    real GPT-2. Its answers are noise. Files that already exist are kept.
    """
    if fmt not in ("tensorflow", "safetensors"):
        raise ValueError(f'fmt {fmt!r}: use "tensorflow" or "safetensors".')
    model_dir = Path(model_dir)
    needed = GPT2_FILES if fmt == "tensorflow" else SAFETENSORS_FILES
    if all((model_dir / name).exists() for name in needed):
        return model_dir
    arrays, hparams = offline_gpt2_arrays(seed)
    if fmt == "tensorflow":
        write_tf_checkpoint(model_dir, arrays, hparams)
    else:
        write_safetensors_checkpoint(model_dir, arrays, hparams)
    return model_dir


def offline_gpt2_arrays(seed: int = 123) -> tuple[dict, dict]:
    """The offline model's random weights under OpenAI's TensorFlow names, and hparams."""
    cfg = model_config(OFFLINE_MODEL)
    d, n_layers, vocab, ctx = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"], 1024
    rng = np.random.default_rng(seed)

    def normal(*shape, std=0.02):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    arrays = {"model/wte": normal(vocab, d), "model/wpe": normal(ctx, d, std=0.01)}
    for i in range(n_layers):
        h = f"model/h{i}"
        arrays[f"{h}/ln_1/g"] = np.ones(d, np.float32)
        arrays[f"{h}/ln_1/b"] = np.zeros(d, np.float32)
        arrays[f"{h}/attn/c_attn/w"] = normal(1, d, 3 * d)
        arrays[f"{h}/attn/c_attn/b"] = np.zeros(3 * d, np.float32)
        arrays[f"{h}/attn/c_proj/w"] = normal(1, d, d)
        arrays[f"{h}/attn/c_proj/b"] = np.zeros(d, np.float32)
        arrays[f"{h}/ln_2/g"] = np.ones(d, np.float32)
        arrays[f"{h}/ln_2/b"] = np.zeros(d, np.float32)
        arrays[f"{h}/mlp/c_fc/w"] = normal(1, d, 4 * d)
        arrays[f"{h}/mlp/c_fc/b"] = np.zeros(4 * d, np.float32)
        arrays[f"{h}/mlp/c_proj/w"] = normal(1, 4 * d, d)
        arrays[f"{h}/mlp/c_proj/b"] = np.zeros(d, np.float32)
    arrays["model/ln_f/g"] = np.ones(d, np.float32)
    arrays["model/ln_f/b"] = np.zeros(d, np.float32)
    hparams = {
        "n_vocab": vocab,
        "n_ctx": ctx,
        "n_embd": d,
        "n_head": cfg["n_heads"],
        "n_layer": n_layers,
    }
    return arrays, hparams


def write_safetensors_checkpoint(model_dir: str | Path, arrays: dict, hparams: dict) -> None:
    """Save arrays named like OpenAI's ("model/h0/ln_1/g") in Hugging Face's form.

    Writes `model.safetensors` ("h.0.ln_1.weight", ...) and a `config.json`.
    """
    from safetensors.numpy import save

    model_dir = Path(model_dir)
    tensors = {
        "wte.weight": arrays["model/wte"],
        "wpe.weight": arrays["model/wpe"],
        "ln_f.weight": arrays["model/ln_f/g"],
        "ln_f.bias": arrays["model/ln_f/b"],
    }
    for i in range(hparams["n_layer"]):
        for hf_name, keys in SAFETENSORS_BLOCK_NAMES.items():
            # OpenAI's weights have a leading axis of 1 ([1, in, out]); Hugging Face's not
            tensors[f"h.{i}.{hf_name}"] = np.squeeze(arrays[f"model/h{i}/" + "/".join(keys)])
    write_atomic(model_dir / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": hparams["n_vocab"],
        "n_positions": hparams["n_ctx"],
        "n_ctx": hparams["n_ctx"],
        "n_embd": hparams["n_embd"],
        "n_head": hparams["n_head"],
        "n_layer": hparams["n_layer"],
    }
    write_json(model_dir / "config.json", config)


def write_tf_checkpoint(model_dir: str | Path, arrays: dict, hparams: dict) -> None:
    """Save named NumPy arrays as a TensorFlow v1 checkpoint plus OpenAI's side files."""
    import tensorflow as tf

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        variables = [
            tf.compat.v1.Variable(value, name=name, dtype=tf.float32)
            for name, value in arrays.items()
        ]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(model_dir / "model.ckpt"))
    # the checkpoint index records a relative path, like OpenAI's
    (model_dir / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'
    )
    write_json(model_dir / "hparams.json", hparams)
    for name in ("encoder.json", "vocab.bpe"):
        write_atomic(model_dir / name, (helpers.TOKENIZER_DIR / name).read_bytes())
