"""GPT-2's published checkpoints: OpenAI's seven TensorFlow files and Hugging Face's
safetensors copy, downloaded (from a backup host when needed) and read into the book's
`(settings, params)`. Used by `course.weights.load_gpt2` (notebooks 04 and 05).
"""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path

import numpy as np

import helpers
from course.downloads import describe_network_error, download_file

GPT2_FILES = helpers.GPT2_FILES
GPT2_BASE_URL = helpers.GPT2_BASE_URL
GPT2_BACKUP_BASE_URL = helpers.GPT2_BACKUP_BASE_URL

SAFETENSORS_BASE_URL = "https://huggingface.co/openai-community"


SAFETENSORS_REPOS = {
    "124M": "gpt2",
    "355M": "gpt2-medium",
    "774M": "gpt2-large",
    "1558M": "gpt2-xl",
}


SAFETENSORS_FILES = ["config.json", "model.safetensors"]


SAFETENSORS_BLOCK_NAMES = {
    "ln_1.weight": ("ln_1", "g"),
    "ln_1.bias": ("ln_1", "b"),
    "attn.c_attn.weight": ("attn", "c_attn", "w"),
    "attn.c_attn.bias": ("attn", "c_attn", "b"),
    "attn.c_proj.weight": ("attn", "c_proj", "w"),
    "attn.c_proj.bias": ("attn", "c_proj", "b"),
    "ln_2.weight": ("ln_2", "g"),
    "ln_2.bias": ("ln_2", "b"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "w"),
    "mlp.c_fc.bias": ("mlp", "c_fc", "b"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "w"),
    "mlp.c_proj.bias": ("mlp", "c_proj", "b"),
}


SAFETENSORS_TOP_NAMES = {
    "wte.weight": "wte",
    "wpe.weight": "wpe",
    "ln_f.weight": "g",
    "ln_f.bias": "b",
}


def download_limit(model_size: str) -> int:
    """The most bytes one downloaded file of GPT-2 `model_size` ("355M") may hold.

    Its float32 weights take 4 bytes a parameter; 5 bytes a parameter plus 128 MiB
    leaves room for any real checkpoint file and stops a server that never ends.
    """
    return int(float(model_size.rstrip("M")) * 1e6) * 5 + (128 << 20)


def download_gpt2_tf_files(
    model_size: str,
    model_dir: str | Path,
    base_url: str = GPT2_BASE_URL,
    backup_base_url: str = GPT2_BACKUP_BASE_URL,
) -> Path:
    """Download the seven files of OpenAI's checkpoint, each from the backup if needed."""
    model_dir = Path(model_dir)
    failed, reasons = [], []
    for filename in GPT2_FILES:
        for base in (base_url, backup_base_url):
            url = f"{base}/{model_size}/{filename}"
            try:
                download_file(url, model_dir / filename, max_bytes=download_limit(model_size))
                break
            except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
                reason = f"{base}: {describe_network_error(exc, url)}"
                if reason not in reasons:  # usually the same for every file
                    reasons.append(reason)
        else:
            failed.append(filename)
    if failed:
        raise ConnectionError(
            f"Could not download {len(failed)} of the GPT-2 {model_size} files from "
            "either source:\n"
            + "".join(f"  {name}\n" for name in failed)
            + "because:\n"
            + "\n".join(f"- {reason}" for reason in reasons)
        )
    return model_dir


def download_gpt2_safetensors(
    model_size: str, model_dir: str | Path, base_url: str = SAFETENSORS_BASE_URL
) -> Path:
    """Download config.json and model.safetensors of the Hugging Face GPT-2 repository."""
    model_dir = Path(model_dir)
    repo_url = f"{base_url}/{SAFETENSORS_REPOS[model_size]}/resolve/main"
    for filename in SAFETENSORS_FILES:
        download_file(
            f"{repo_url}/{filename}", model_dir / filename, max_bytes=download_limit(model_size)
        )
    return model_dir


class DamagedCheckpoint(RuntimeError):
    """A GPT-2 checkpoint's files are there but cannot be read (cut off or corrupted)."""


def read_gpt2_tf_files(model_dir: str | Path) -> tuple[dict, dict]:
    """`(settings, params)` from OpenAI's seven files in `model_dir`.

    Missing files raise FileNotFoundError, damaged ones DamagedCheckpoint; both name
    the folder and say to delete it.
    """
    model_dir = Path(model_dir)
    settings = read_settings_json(model_dir / "hparams.json", HPARAMS_KEYS)
    return settings, load_gpt2_params_from_tf_ckpt(tf_checkpoint_path(model_dir), settings)


HPARAMS_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


def read_settings_json(path: Path, keys: tuple[str, ...]) -> dict:
    """A checkpoint's JSON settings file (hparams.json, config.json), checked for `keys`."""
    fix = f"Delete the folder {path.parent} and run the cell again to download it anew."
    if not path.exists():
        raise FileNotFoundError(f"{path.name} is missing in {path.parent}. {fix}")
    try:
        settings = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(f"{path} is damaged ({exc}). {fix}") from None
    missing = [key for key in keys if not isinstance(settings, dict) or key not in settings]
    if missing:
        raise DamagedCheckpoint(f"{path} lacks {', '.join(missing)}: it is damaged. {fix}")
    return settings


def tf_checkpoint_path(model_dir: str | Path) -> str:
    """The checkpoint prefix (".../model.ckpt") that TensorFlow reads."""
    import tensorflow as tf

    path = tf.train.latest_checkpoint(str(model_dir))
    if path is None:
        raise FileNotFoundError(
            f"No TensorFlow checkpoint in {model_dir}: it needs the files "
            f"{', '.join(GPT2_FILES)}. Delete the folder and run the cell again."
        )
    return path


def load_gpt2_params_from_tf_ckpt(ckpt_path: str, settings: dict) -> dict:
    """`helpers.load_gpt2_params_from_tf_ckpt`, with a clear message for damaged files."""
    try:
        return helpers.load_gpt2_params_from_tf_ckpt(ckpt_path, settings)
    except Exception as exc:  # TensorFlow raises several error types here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DamagedCheckpoint(
            f"Could not read the TensorFlow checkpoint {ckpt_path}: {reason}\n"
            "The files are probably incomplete or corrupted: delete the folder "
            f"{Path(ckpt_path).parent} and run the cell again to download them anew."
        ) from None


def load_gpt2_from_safetensors(model_dir: str | Path) -> tuple[dict, dict]:
    """Read Hugging Face's GPT-2 files into `(settings, params)` like the TF loader's.

    `config.json` gives the settings (the keys of OpenAI's hparams.json);
    `model.safetensors` the weights: `h.3.attn.c_attn.weight` becomes
    `params["blocks"][3]["attn"]["c_attn"]["w"]`, `ln_f.weight` becomes `params["g"]`.
    """
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    config = read_settings_json(model_dir / "config.json", ("vocab_size", "n_embd", "n_head"))
    if "n_layer" not in config or ("n_ctx" not in config and "n_positions" not in config):
        raise DamagedCheckpoint(
            f"{model_dir / 'config.json'} is not a GPT-2 configuration (it lacks n_layer or "
            f"n_positions). Delete the folder {model_dir} and run the cell again."
        )
    settings = {
        "n_vocab": config["vocab_size"],
        "n_ctx": config.get("n_ctx", config["n_positions"]),
        "n_embd": config["n_embd"],
        "n_head": config["n_head"],
        "n_layer": config["n_layer"],
    }
    try:
        tensors = load_file(str(model_dir / "model.safetensors"))
    except Exception as exc:  # the safetensors package has its own error type
        raise DamagedCheckpoint(
            f"Could not read {model_dir / 'model.safetensors'}: {exc}\n"
            "The file is probably incomplete or corrupted: delete it and run the cell "
            "again to download it anew."
        ) from None
    params: dict = {"blocks": [{} for _ in range(settings["n_layer"])]}
    found = set()
    for full_name, array in tensors.items():
        name = full_name.removeprefix("transformer.")
        block = re.fullmatch(r"h\.(\d+)\.(.+)", name)
        if name == "lm_head.weight" or (block and block[2] in ("attn.bias", "attn.masked_bias")):
            continue  # the output head (tied to wte) and the causal-mask buffers
        if name in SAFETENSORS_TOP_NAMES:
            params[SAFETENSORS_TOP_NAMES[name]] = array.astype(np.float32, copy=False)
        elif block and block[2] in SAFETENSORS_BLOCK_NAMES and int(block[1]) < settings["n_layer"]:
            *keys, last = SAFETENSORS_BLOCK_NAMES[block[2]]
            target = params["blocks"][int(block[1])]
            for key in keys:
                target = target.setdefault(key, {})
            target[last] = array.astype(np.float32, copy=False)
        else:
            raise ValueError(
                f"{model_dir / 'model.safetensors'} holds {full_name!r}, which is not a "
                f"tensor of a {settings['n_layer']}-layer GPT-2: download the file of the "
                "model size you chose (openai-community/gpt2, gpt2-medium, ...)."
            )
        found.add(name)
    expected = list(SAFETENSORS_TOP_NAMES) + [
        f"h.{i}.{n}" for i in range(settings["n_layer"]) for n in SAFETENSORS_BLOCK_NAMES
    ]
    missing = [n for n in expected if n not in found]
    if missing:
        raise ValueError(
            f"{model_dir / 'model.safetensors'} lacks {len(missing)} of the "
            f"{len(expected)} GPT-2 tensors (first: {missing[0]}): delete it and run the "
            "cell again to download it anew."
        )
    return settings, params
