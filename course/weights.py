"""GPT-2 weights: robust downloads, the safetensors source, the offline model, .pth files.

`helpers.download_and_load_gpt2` is the book's loader. `load_gpt2` does the same
job for the course: downloads resume where they stopped and fall back to a backup
host and then to Hugging Face's safetensors files; network failures are explained
with the usual fix; and `model_size="offline"` writes a tiny GPT-2 with random
weights in OpenAI's exact seven-file layout, so the book's loading code runs with no
network. Reading `.pth` files names the file and the fix when one is damaged.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import helpers
from course.artifacts import (
    require_artifact,
    sha256_of_file,
    write_atomic,
    write_json,
)
from course.settings import OFFLINE_MODEL, model_config

GPT2_FILES = helpers.GPT2_FILES
GPT2_BASE_URL = helpers.GPT2_BASE_URL
GPT2_BACKUP_BASE_URL = helpers.GPT2_BACKUP_BASE_URL
TOKENIZER_DIR = helpers.TOKENIZER_DIR

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


def describe_network_error(exc: BaseException, url: str | None = None) -> str:
    """A short explanation of a failed download, with the usual fix.

    `url`, when given, lets it name the proxy setting the download went through.
    """
    import ssl

    reason = getattr(exc, "reason", exc)
    text = str(reason).rstrip(".")
    if isinstance(reason, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"{text}. The server's TLS certificate could not be verified, so nothing was "
            "downloaded. On macOS, run 'Install Certificates.command' from your Python's "
            "folder in Applications. Behind a company proxy or antivirus that inspects "
            "HTTPS, set the environment variable SSL_CERT_FILE to its certificate bundle "
            "(a .pem file from your IT department) and restart Jupyter."
        )
    if isinstance(reason, ssl.SSLError):
        return (
            f"{text}. The secure (TLS) connection failed: a proxy, firewall or antivirus "
            "may be in the way. Try another network, or set HTTPS_PROXY to your proxy."
        )
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code == 407:
            return (
                "HTTP 407 Proxy Authentication Required: the proxy wants a user name and "
                "password. Put them into the proxy address: "
                "HTTPS_PROXY=http://user:password@proxy:8080."
            )
        return f"HTTP {exc.code} {exc.reason}"
    parts = urllib.parse.urlsplit(url or "https://")
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not (parts.hostname and urllib.request.proxy_bypass(parts.hostname)):
        proxy = re.sub(r"//[^/@]*@", "//", proxy)  # never print a proxy password
        return (
            f"{text}. The download goes through the proxy {proxy} (environment variable "
            f"{parts.scheme.upper()}_PROXY): check that address and that the proxy runs, "
            "or unset the variable if you are not behind a proxy."
        )
    return (
        f"{text}. Check the internet connection; behind a proxy set HTTPS_PROXY "
        "(for example HTTPS_PROXY=http://proxy:8080) before starting Jupyter."
    )


class DownloadTooLarge(ValueError):
    """A download passed the size allowed for it; nothing of it was kept."""

    def __init__(self, url: str, limit: int, size: int | None = None):
        self.url, self.limit, self.size = url, limit, size
        said = f"announces {size:,} bytes, more than" if size is not None else "sent more than"
        super().__init__(
            f"The download from {url} {said} the {limit:,} bytes allowed for it, so it was "
            "stopped and nothing of it was kept. Check that the address names the file you meant."
        )


class DownloadWriteError(RuntimeError):
    """A download could not be saved on this machine (a full disk, a folder not writable).

    The network is not to blame, so the partial file is deleted; the message says what
    to do. (Not an OSError, so that code catching network errors does not mistake it
    for one.)
    """

    def __init__(self, url: str, path: Path, exc: OSError):
        self.url, self.path, self.os_error = url, path, exc
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            what = f"the disk is full ({reason})"
            fix = "Free some space on that disk, or keep the file on another one"
        elif exc.errno == errno.EFBIG:
            what = f"the file system refuses a file this large ({reason})"
            fix = "Keep the file on another disk"
        elif exc.errno == errno.ENAMETOOLONG:
            what = f"the file name is too long for this file system ({reason})"
            fix = "Keep the file in a folder with a shorter path"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            what = f"the folder is not writable ({reason})"
            fix = "Keep the file in a folder you can write to"
        else:
            what = reason
            fix = "Fix the cause"
        super().__init__(
            f"Could not save the download of {url} as {path}: {what}. This is not a "
            "network problem; the partial file was deleted. "
            f"{fix} (COURSE_ARTIFACTS chooses the folder of datasets, COURSE_MODELS_DIR "
            "that of GPT-2 weights) and run the cell again."
        )


class _Watch:
    """The sockets of one download, shut down when its time is up (`expire`)."""

    def __init__(self):
        self.sockets: list[socket.socket] = []
        self.expired = False
        self.lock = threading.Lock()

    def add(self, sock) -> None:
        with self.lock:
            self.sockets.append(sock)
            if not self.expired:
                return
        self._shut(sock)

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            sockets = list(self.sockets)
        for sock in sockets:
            self._shut(sock)

    @staticmethod
    def _shut(sock) -> None:
        with contextlib.suppress(OSError, ValueError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a read that waits for data


class _WatchedHandler:
    """urllib's HTTP(S) handler, but every connection's socket is given to a `_Watch`."""

    watch: _Watch

    def do_open(self, http_class, req, **kwargs):
        watch = self.watch

        class Connection(http_class):
            def __init__(self, *args, **kw):
                super().__init__(*args, **kw)
                create = self._create_connection

                def create_and_watch(*a, **k):
                    sock = create(*a, **k)
                    watch.add(sock)
                    return sock

                self._create_connection = create_and_watch

            def connect(self):
                super().connect()
                watch.add(self.sock)  # for HTTPS: the TLS socket over the one above

        return super().do_open(Connection, req, **kwargs)


class _HTTPHandler(_WatchedHandler, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_WatchedHandler, urllib.request.HTTPSHandler):
    pass


def _open_watched(request: urllib.request.Request, watch: _Watch, timeout: float):
    """urlopen (with the proxy settings of the environment), its sockets in `watch`."""
    handlers = [_HTTPHandler(), _HTTPSHandler()]
    for handler in handlers:
        handler.watch = watch
    return urllib.request.build_opener(*handlers).open(request, timeout=timeout)


def _too_slow(url: str, max_seconds: float) -> TimeoutError:
    return TimeoutError(
        f"the download took longer than the {max_seconds:,.0f} s allowed for it in all; "
        "what arrived is kept, and running the cell again continues from there"
    )


def download_file(
    url: str,
    destination: str | Path,
    show_progress: bool = True,
    expected_sha256: str | None = None,
    max_bytes: int | None = None,
    max_seconds: float | None = None,
) -> Path:
    """Download `url` to `destination`, resuming a partial download.

    Bytes arrive in `destination.part`; the file gets its final name only when
    complete (and, with `expected_sha256`, when its checksum matches), so an existing
    `destination` is always whole and is skipped. A mismatch deletes the download
    and raises ValueError.

    Each wait for the server lasts at most 60 s. `max_bytes` bounds the file's size:
    a larger one (announced, or streaming past it) is stopped and deleted
    (DownloadTooLarge). `max_seconds` bounds the whole download, connecting and
    headers included: past it, TimeoutError, and the bytes so far are kept for the
    next try. A file that cannot be written (a full disk) raises DownloadWriteError
    and deletes the partial file.
    """
    destination = Path(destination)
    if destination.exists():
        return destination
    part = destination.with_name(destination.name + ".part")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadWriteError(url, destination, exc) from None
    watch = _Watch()
    timer = None
    if max_seconds is not None:
        timer = threading.Timer(max_seconds, watch.expire)
        timer.daemon = True
        timer.start()
    try:
        _download(url, part, watch, show_progress, max_bytes)
    except DownloadWriteError:
        with contextlib.suppress(OSError):
            part.unlink()
        raise
    except (OSError, http.client.HTTPException):
        if watch.expired:
            raise _too_slow(url, max_seconds) from None
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if watch.expired:  # the connection was shut mid-file: it looks like an early end
        raise _too_slow(url, max_seconds)
    if expected_sha256 is not None:
        actual = sha256_of_file(part)
        if actual != expected_sha256.lower():
            part.unlink()
            raise ValueError(
                f"The file downloaded from {url} has SHA-256 {actual}, but {expected_sha256} "
                "was expected: it is not the file this course was written for (it changed "
                "on the server, or a proxy or login page answered instead). The download "
                "was deleted. Run the cell again; if this repeats, download the file in a "
                f"browser and save it as {destination}."
            )
    try:
        os.replace(part, destination)
    except OSError as exc:
        raise DownloadWriteError(url, destination, exc) from None
    return destination


def _download(
    url: str, part: Path, watch: _Watch, show_progress: bool, max_bytes: int | None
) -> None:
    """Fetch `url` into `part`, continuing what it holds (see `download_file`)."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = _open_watched(request, watch, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not have:
            raise
        # 416 "range not satisfiable": the part file already holds all the bytes,
        # unless the server's size ("bytes */SIZE") says it belongs to another file
        size = re.fullmatch(r"bytes \*/(\d+)", (exc.headers or {}).get("Content-Range", ""))
        if size is not None and int(size[1]) != have:
            part.unlink()
            return _download(url, part, watch, show_progress, max_bytes)
        if max_bytes is not None and have > max_bytes:
            part.unlink()
            raise DownloadTooLarge(url, max_bytes, have) from None
        return
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the range: start again
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None and length.isdigit() else None
        if max_bytes is not None and total is not None and total > max_bytes:
            with contextlib.suppress(OSError):
                part.unlink()
            raise DownloadTooLarge(url, max_bytes, total)
        try:
            f = open(part, "ab" if have else "wb")
        except OSError as exc:
            raise DownloadWriteError(url, part, exc) from None
        size = have
        try:
            with tqdm(
                total=total,
                initial=have,
                unit="iB",
                unit_scale=True,
                desc=part.name.removesuffix(".part"),
                disable=not show_progress,
            ) as bar:
                # read1: whatever has arrived, so a slow server is seen between pieces
                for chunk in iter(lambda: response.read1(1 << 16), b""):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        f.close()
                        part.unlink()
                        raise DownloadTooLarge(url, max_bytes)
                    try:
                        f.write(chunk)
                    except OSError as exc:
                        raise DownloadWriteError(url, part, exc) from None
                    bar.update(len(chunk))
        finally:
            try:
                f.close()
            except OSError as exc:  # the last buffered bytes did not fit
                raise DownloadWriteError(url, part, exc) from None
    if watch.expired:
        return
    if total is not None and part.stat().st_size != total:
        raise ConnectionError(
            f"Download of {url} stopped after {part.stat().st_size} of {total} bytes. "
            "Run the cell again: it continues where it stopped."
        )


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
        write_atomic(model_dir / name, (TOKENIZER_DIR / name).read_bytes())


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
