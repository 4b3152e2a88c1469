"""GPT-2 weights into a model: `load_gpt2` (the book's `download_and_load_gpt2`, with
fallbacks), `load_weights_into_gpt` with a shape check, and `.pth` files of notebooks 05
and 10 read with a clear error. Used by notebooks 04, 05, 07 and 10 and course.finetune.
"""

from __future__ import annotations

import http.client
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import helpers
from course.artifacts import require_artifact

# names that run_course.py, course.data and the tests use from here (course.weights)
from course.downloads import (  # noqa: F401
    DownloadTooLarge,
    DownloadWriteError,
    describe_network_error,
    download_file,
)
from course.gpt2_files import (  # noqa: F401
    GPT2_BACKUP_BASE_URL,
    GPT2_BASE_URL,
    GPT2_FILES,
    SAFETENSORS_BASE_URL,
    SAFETENSORS_FILES,
    SAFETENSORS_REPOS,
    DamagedCheckpoint,
    download_gpt2_safetensors,
    download_gpt2_tf_files,
    download_limit,
    load_gpt2_from_safetensors,
    read_gpt2_tf_files,
    tf_checkpoint_path,
)
from course.offline_model import load_offline_gpt2, write_offline_gpt2  # noqa: F401


def load_gpt2(
    model_size: str,
    models_dir: str | Path,
    base_url: str = GPT2_BASE_URL,
    backup_base_url: str = GPT2_BACKUP_BASE_URL,
    source: str = "auto",
    safetensors_base_url: str = SAFETENSORS_BASE_URL,
) -> tuple[dict, dict]:
    """Download GPT-2 (if needed) and return `(settings, params)` in the book's layout.

    `model_size` is "124M", "355M", "774M", "1558M", or "offline" for the tiny
    random-weight model that `write_offline_gpt2` makes with no network.
    `source="auto"` reads OpenAI's TensorFlow checkpoint, and the safetensors file
    of Hugging Face's openai-community/gpt2* repositories when TensorFlow cannot be
    imported or OpenAI's host and its backup fail; "tensorflow" or "safetensors"
    forces one. It prints which source it used.
    """
    if model_size not in ("124M", "355M", "774M", "1558M", "offline"):
        raise ValueError(
            f'model_size {model_size!r}: use "124M", "355M", "774M", "1558M" or "offline".'
        )
    if source not in ("auto", "tensorflow", "safetensors"):
        raise ValueError(f'source {source!r}: use "auto", "tensorflow" or "safetensors".')
    model_dir = Path(models_dir) / model_size
    name = (
        "the offline model (random weights)" if model_size == "offline" else f"GPT-2 {model_size}"
    )
    why_not_tensorflow = None
    if source in ("auto", "tensorflow"):
        try:
            import tensorflow  # noqa: F401
        except Exception as exc:  # no wheel for this Python or platform, or a broken install
            why_not_tensorflow = f"TensorFlow cannot be imported ({type(exc).__name__}: {exc})."
            if source == "tensorflow":
                raise ImportError(
                    f"{why_not_tensorflow} Install it (pip install tensorflow), or use "
                    'source="safetensors", which needs no TensorFlow.'
                ) from exc
    if source != "safetensors" and why_not_tensorflow is None:
        try:
            if model_size != "offline":
                download_gpt2_tf_files(model_size, model_dir, base_url, backup_base_url)
        except ConnectionError as exc:
            if source == "tensorflow":
                raise ConnectionError(
                    f"{exc}\nPut these files into {model_dir.resolve()} (for example copied "
                    "from a machine that has them) and run the cell again, use source="
                    '"safetensors", or choose the offline model.'
                ) from exc
            why_not_tensorflow = f"OpenAI's host and its backup failed. {exc}"
        else:
            if model_size == "offline":
                settings, params = load_offline_gpt2(model_dir, "tensorflow")
            else:
                settings, params = read_gpt2_tf_files(model_dir)
            print(f"Loaded {name} from OpenAI's TensorFlow checkpoint (source: tensorflow).")
            return settings, params
    if why_not_tensorflow is not None:
        print(f"{why_not_tensorflow}\nUsing the safetensors checkpoint instead.")
    if model_size == "offline":
        settings, params = load_offline_gpt2(model_dir, "safetensors")
    else:
        try:
            download_gpt2_safetensors(model_size, model_dir, safetensors_base_url)
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            url = f"{safetensors_base_url}/{SAFETENSORS_REPOS[model_size]}"
            raise ConnectionError(
                f"Could not download GPT-2 {model_size} from {url}: "
                f"{describe_network_error(exc, url)}\n"
                + (f"Before that: {why_not_tensorflow}\n" if why_not_tensorflow else "")
                + f"Put {' and '.join(SAFETENSORS_FILES)} into {model_dir.resolve()} (for "
                "example copied from a machine that has them) and run the cell again, or "
                "choose the offline model."
            ) from exc
        settings, params = load_gpt2_from_safetensors(model_dir)
    print(f"Loaded {name} from the safetensors checkpoint (source: safetensors).")
    return settings, params


def download_and_load_gpt2(model_size: str, models_dir: str | Path) -> tuple[dict, dict]:
    """The book's `download_and_load_gpt2(model_size, models_dir)`, run by `load_gpt2`.

    The same call and the same `(settings, params)`, with `load_gpt2`'s resumed
    downloads and fallbacks. `model_size` is the part of a model's name in parentheses,
    as listing 7.7 takes it out: "124M", "355M", "774M", "1558M", or "tiny" for the
    course's offline model "offline (tiny)" (which `load_gpt2` calls "offline").
    """
    return load_gpt2("offline" if model_size == "tiny" else model_size, models_dir)


def load_weights_into_gpt(gpt: nn.Module, params: dict) -> None:
    """`helpers.load_weights_into_gpt`, after checking that every tensor's shape fits.

    A mismatch names the model's tensor and both shapes ("trf_blocks.0.att.W_query.weight:
    the model has (768, 768), the checkpoint has (1024, 1024)"), before anything changes.
    """
    if len(params["blocks"]) != len(gpt.trf_blocks):
        raise ValueError(
            f"The checkpoint has {len(params['blocks'])} transformer blocks, the model "
            f"{len(gpt.trf_blocks)}: choose the model size the weights were made for."
        )
    for name, model_shape, checkpoint_shape in _shapes_to_load(gpt, params):
        if tuple(model_shape) != tuple(checkpoint_shape):
            raise ValueError(
                f"Shape mismatch for {name}: the model has {tuple(model_shape)}, the "
                f"checkpoint has {tuple(checkpoint_shape)}. The model configuration does "
                "not match the checkpoint: choose the model size the weights were made for."
            )
    helpers.load_weights_into_gpt(gpt, params)


def _shapes_to_load(gpt: nn.Module, params: dict):
    """(model tensor name, its shape, the shape the book's mapping gives it), one by one."""

    def split_shape(array, transpose):  # query, key, value: a third of the last axis each
        shape = (*np.shape(array)[:-1], np.shape(array)[-1] // 3)
        return shape[::-1] if transpose else shape

    def t(array):
        return np.shape(array)[::-1]

    yield "pos_emb.weight", gpt.pos_emb.weight.shape, np.shape(params["wpe"])
    yield "tok_emb.weight", gpt.tok_emb.weight.shape, np.shape(params["wte"])
    for b, (block, p) in enumerate(zip(gpt.trf_blocks, params["blocks"], strict=True)):
        pre, att, ff = f"trf_blocks.{b}", block.att, block.ff.layers
        c_attn, c_proj = p["attn"]["c_attn"], p["attn"]["c_proj"]
        for part in ("W_query", "W_key", "W_value"):
            yield (
                f"{pre}.att.{part}.weight",
                getattr(att, part).weight.shape,
                split_shape(np.squeeze(c_attn["w"]), transpose=True),
            )
            yield (
                f"{pre}.att.{part}.bias",
                getattr(att, part).bias.shape,
                split_shape(c_attn["b"], transpose=False),
            )
        yield f"{pre}.att.out_proj.weight", att.out_proj.weight.shape, t(np.squeeze(c_proj["w"]))
        yield f"{pre}.att.out_proj.bias", att.out_proj.bias.shape, np.shape(c_proj["b"])
        fc, fc_proj = p["mlp"]["c_fc"], p["mlp"]["c_proj"]
        yield f"{pre}.ff.layers.0.weight", ff[0].weight.shape, t(np.squeeze(fc["w"]))
        yield f"{pre}.ff.layers.0.bias", ff[0].bias.shape, np.shape(fc["b"])
        yield f"{pre}.ff.layers.2.weight", ff[2].weight.shape, t(np.squeeze(fc_proj["w"]))
        yield f"{pre}.ff.layers.2.bias", ff[2].bias.shape, np.shape(fc_proj["b"])
        for norm, key in (("norm1", "ln_1"), ("norm2", "ln_2")):
            yield f"{pre}.{norm}.scale", getattr(block, norm).scale.shape, np.shape(p[key]["g"])
            yield f"{pre}.{norm}.shift", getattr(block, norm).shift.shape, np.shape(p[key]["b"])
    yield "final_norm.scale", gpt.final_norm.scale.shape, np.shape(params["g"])
    yield "final_norm.shift", gpt.final_norm.shift.shape, np.shape(params["b"])
    yield "out_head.weight", gpt.out_head.weight.shape, np.shape(params["wte"])


def read_pth(path: str | Path, notebook: str = "05_instruction_finetuning") -> Any:
    """`torch.load` a .pth file onto the CPU; a missing or damaged file names the fix."""
    path = require_artifact(path, notebook)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several error types for damaged files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RuntimeError(
            f"{path} could not be read ({type(exc).__name__}: {reason}). The file is "
            "damaged or incomplete (an interrupted copy?) or is not a PyTorch file. "
            f"Delete it and run notebook {notebook} again to write it anew."
        ) from None


def load_state_dict_checked(model: nn.Module, state_dict: Any, source: str) -> None:
    """`model.load_state_dict`, but a mismatch lists the tensors that do not fit.

    The causal-mask buffers (`...att.mask`) are constants, so files with or without
    them load alike; prefixes added by `torch.compile` or DataParallel are removed.
    """
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ValueError(
            f"{source} holds no model weights (a dict of tensors, as written by "
            "torch.save(model.state_dict(), path)). Delete it and run notebook "
            "05_instruction_finetuning again."
        )
    state_dict = {
        key.removeprefix("_orig_mod.").removeprefix("module."): value
        for key, value in state_dict.items()
    }
    own = model.state_dict()

    def optional(key):
        return key.endswith(".att.mask")

    problems = [
        f"{key}: the file has {tuple(value.shape)}, the model {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and not optional(key) and value.shape != own[key].shape
    ]
    problems += [
        f"{key}: missing in the file" for key in own if key not in state_dict and not optional(key)
    ]
    problems += [
        f"{key}: in the file, not in the model"
        for key in state_dict
        if key not in own and not optional(key)
    ]
    if problems:
        listed = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(
            f"The weights in {source} do not fit this model ({len(problems)} tensors):\n"
            f"  {listed}{more}\n"
            "They were saved for another model configuration: set COURSE_MODEL to the size "
            "they were trained with, or run notebook 05_instruction_finetuning again for "
            "this model."
        )
    model.load_state_dict(
        {key: value for key, value in state_dict.items() if not optional(key)}, strict=False
    )


def load_model_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a .pth file of weights into `model` (notebook 05's `<model>-sft.pth`).

    Reads the book's `torch.save(model.state_dict(), path)` files and this course's
    training checkpoints. A missing, damaged or mismatched file stops with a message
    that names the file, the tensors that do not fit and what to do.
    """
    state = read_pth(path)
    if isinstance(state, dict) and "model_state_dict" in state:  # a training checkpoint
        state = state["model_state_dict"]
    load_state_dict_checked(model, state, str(path))
    return model
