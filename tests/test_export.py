"""Notebook 11's export: the GGUF file runs in llama.cpp as the course's own model does.

The offline model (random weights, the course's real loading path) is written to
GGUF in f32, f16 and Q8_0 and run in llama.cpp through llama-cpp-python, the engine
inside Ollama. These tests never skip: llama-cpp-python is in requirements-dev.txt
and .ci/run installs it.

Tolerances, as a share of the largest logit's size (the offline model's logits lie
within about ±0.8):
- f32: at most 0.5 % apart at every position, and greedy decoding gives exactly the
  tokens of helpers.generate and course.speed.generate_fast. llama.cpp's CPU kernels
  compute GELU from a table of 16-bit values (its input rounded to f16: up to about
  0.4 % off per value) and sum in another order; measured 0.04 % on the offline
  model, 0.2 % on a wider one with larger weights;
- f16: the same top token at the last position, at most 1 % apart (measured 0.08 %);
- Q8_0: the same top token, at most 10 % apart (measured 2 %).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from course import (
    artifacts,
    export,
    gguf_file,
    judge,
    llama_engine,
    lora,
    ollama_registry,
    settings,
    speed,
    weights,
)

F32_TOLERANCE = 5e-3  # of the largest |logit|
F16_TOLERANCE = 1e-2
Q8_0_TOLERANCE = 0.1
NEW_TOKENS = 16
N_CTX = 256


@pytest.fixture(scope="module")
def cfg() -> dict:
    return settings.model_config("offline")


@pytest.fixture(scope="module")
def model(tmp_path_factory, cfg) -> helpers.GPTModel:
    """The offline model, loaded as a real download is (its safetensors form, no TensorFlow)."""
    folder = tmp_path_factory.mktemp("offline-st")
    weights.write_offline_gpt2(folder, fmt="safetensors")
    _, params = weights.load_gpt2_from_safetensors(folder)
    gpt = helpers.GPTModel(cfg)
    helpers.load_weights_into_gpt(gpt, params)
    return gpt.eval()


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, model, cfg) -> dict:
    folder = tmp_path_factory.mktemp("gguf")
    return {
        kind: gguf_file.write_gguf(model, cfg, folder / f"offline-{kind}.gguf", kind)
        for kind in gguf_file.TYPES
    }


@pytest.fixture(scope="module")
def engines(gguf_files) -> dict:
    """llama.cpp's model of each file, opened once."""
    return {
        kind: llama_engine.open_llama(path, n_ctx=N_CTX, logits_all=True)
        for kind, path in gguf_files.items()
    }


@pytest.fixture(scope="module")
def prompts(data) -> list[str]:
    """Course prompts: test instructions with and without input, in both prompt styles."""
    _, _, test_data = helpers.split_data(data)
    with_input = [e for e in test_data if e["input"]][:2]
    without = [e for e in test_data if not e["input"]][:2]
    return [helpers.format_input(e, "alpaca") for e in with_input + without] + [
        helpers.format_input(without[0], "phi3") + helpers.format_response({"output": ""}, "phi3")
    ]


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    """The largest difference, as a share of the largest logit's size."""
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


# -- the file -------------------------------------------------------------------------------


def test_the_tensor_names_are_llama_cpps_gpt2_names_and_use_every_parameter(model, cfg):
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    allowed = set()
    for tensor in MODEL_TENSORS[MODEL_ARCH.GPT2]:
        for b in range(cfg["n_layers"]):
            for suffix in (".weight", ".bias"):
                allowed.add(TENSOR_NAMES[tensor].format(bid=b) + suffix)
    rows = gguf_file.tensor_name_map(cfg["n_layers"])
    assert {name for name, _ in rows} <= allowed
    used = []
    for _, source in rows:
        if "+" in source:
            prefix, leaf = source.split(".att.")[0], source.rsplit(".", 1)[1]
            used += [f"{prefix}.att.{w}.{leaf}" for w in ("W_query", "W_key", "W_value")]
        else:
            used.append(source)
    parameters = [k for k in model.state_dict() if not k.endswith(".att.mask")]
    assert sorted(used) == sorted(parameters)  # each parameter exactly once


def test_the_file_holds_the_weights_in_pytorchs_layout_and_the_metadata(model, gguf_files, cfg):
    import gguf

    path = gguf_files["f32"]
    reader = gguf.GGUFReader(str(path))
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    d = cfg["emb_dim"]
    # GGUF lists sizes innermost first: nn.Linear's (out, in) reads as [in, out]
    assert shapes["blk.0.attn_qkv.weight"] == [d, 3 * d]
    assert shapes["blk.0.ffn_up.weight"] == [d, 4 * d]
    assert shapes["blk.0.ffn_down.weight"] == [4 * d, d]
    assert shapes["token_embd.weight"] == [d, cfg["vocab_size"]]
    arrays = gguf_file.read_gguf_tensors(path)
    att = model.trf_blocks[1].att
    qkv = arrays["blk.1.attn_qkv.weight"]
    assert np.array_equal(qkv[:d], att.W_query.weight.detach().numpy())
    assert np.array_equal(qkv[d : 2 * d], att.W_key.weight.detach().numpy())
    assert np.array_equal(qkv[2 * d :], att.W_value.weight.detach().numpy())
    assert np.array_equal(arrays["output.weight"], model.out_head.weight.detach().numpy())
    # and back: the file's numbers are the model's, every one of them
    back = gguf_file.state_dict_from_gguf(path, cfg["n_layers"])
    for key, value in model.state_dict().items():
        if not key.endswith(".att.mask"):
            assert torch.equal(back[key], value), key
    meta = gguf_file.gguf_metadata(path)
    assert meta["general.architecture"] == "gpt2"
    assert meta["gpt2.block_count"] == cfg["n_layers"]
    assert meta["gpt2.attention.head_count"] == cfg["n_heads"]
    assert meta["gpt2.context_length"] == cfg["context_length"]
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.tokens (count)"] == 50257
    assert meta["tokenizer.ggml.merges (count)"] == 50000
    assert meta["tokenizer.ggml.eos_token_id"] == 50256


def test_f16_and_q8_0_files_are_smaller_and_round_the_weights(gguf_files, model, cfg):
    sizes = {kind: path.stat().st_size for kind, path in gguf_files.items()}
    assert sizes["f32"] > 1.8 * sizes["f16"]
    assert sizes["q8_0"] < 0.65 * sizes["f16"]
    w = model.trf_blocks[0].ff.layers[0].weight.detach().numpy()
    for kind, bound in (("f16", 1e-3), ("q8_0", 1e-2)):
        back = gguf_file.read_gguf_tensors(gguf_files[kind])["blk.0.ffn_up.weight"]
        error = np.abs(back - w).max() / np.abs(w).max()
        assert 0 < error < bound, (kind, error)


# -- llama.cpp ----------------------------------------------------------------------------


def test_llama_cpp_tokenizes_like_tiktoken(engines, prompts, tokenizer):
    llm = engines["f32"]
    texts = prompts + [
        "naïve café, 1,234.5 km²  —  emoji 🙂 and\ttabs\n\n\nthree newlines",
        "It's  double  spaced; don't ' stop'!",
    ]
    for text in texts:
        assert llama_engine.llama_tokenize(llm, text) == tokenizer.encode(text), text
    ids = tokenizer.encode("Hello<|endoftext|>", allowed_special={"<|endoftext|>"})
    assert llama_engine.llama_tokenize(llm, "Hello<|endoftext|>") == ids
    assert ids[-1] == export.END_OF_TEXT_ID


def test_f32_logits_match_the_book_model_at_every_position(engines, model, prompts, tokenizer):
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        ours, theirs = torch_logits(model, ids), llama_engine.llama_logits(engines["f32"], ids)
        assert relative_difference(ours, theirs) < F32_TOLERANCE, prompt[:40]
        assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_f32_greedy_tokens_are_the_courses(engines, model, prompts, tokenizer, cfg):
    llm = engines["f32"]
    first = tokenizer.encode(prompts[0])
    book = helpers.generate(
        model, torch.tensor([first]), NEW_TOKENS, cfg["context_length"], eos_id=50256
    )[0, len(first) :].tolist()
    assert llama_engine.llama_greedy(llm, first, NEW_TOKENS, eos_id=50256) == book
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        fast = speed.generate_fast(
            model, torch.tensor([ids]), NEW_TOKENS, cfg["context_length"], eos_id=50256
        )[0, len(ids) :].tolist()
        assert llama_engine.llama_greedy(llm, ids, NEW_TOKENS, eos_id=50256) == fast, prompt[:40]


def test_the_streamed_chat_is_greedy_decoding(engines, model, prompts, tokenizer, cfg):
    llm = engines["f32"]
    ids = tokenizer.encode(prompts[2])
    tokens = speed.generate_fast(
        model, torch.tensor([ids]), NEW_TOKENS, cfg["context_length"], eos_id=50256
    )[0, len(ids) :].tolist()
    pieces = list(llama_engine.chat_stream(llm, prompts[2], max_tokens=NEW_TOKENS, stop=[]))
    assert len(pieces) > 1  # streamed piece by piece
    assert "".join(pieces) == tokenizer.decode(tokens)


@pytest.mark.parametrize("kind, tolerance", [("f16", F16_TOLERANCE), ("q8_0", Q8_0_TOLERANCE)])
def test_rounded_files_keep_the_top_token(engines, model, prompts, tokenizer, kind, tolerance):
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        ours, theirs = (
            torch_logits(model, ids)[-1],
            llama_engine.llama_logits(engines[kind], ids)[-1],
        )
        assert ours.argmax() == theirs.argmax(), prompt[:40]
        assert relative_difference(ours, theirs) < tolerance


def test_another_shape_and_lora_merged_weights_run_the_same(tmp_path, model, tokenizer, prompts):
    torch.manual_seed(0)
    cfg = {**settings.model_config("offline"), "emb_dim": 96, "n_heads": 3, "n_layers": 3}
    other = helpers.GPTModel(cfg)
    other.tok_emb.weight.data = model.tok_emb.weight.detach()[:, :1].repeat(1, 96) * 0.5
    other.out_head.weight.data = torch.randn(cfg["vocab_size"], 96) * 0.05
    lora.apply_lora(other, rank=4, alpha=8)
    for module in other.modules():
        if isinstance(module, helpers.LoRALayer):
            torch.nn.init.normal_(module.B, std=0.05)  # a trained adapter is not zero
    other.eval()
    merged = lora.merged_state_dict(other)
    path = gguf_file.write_gguf(merged, cfg, tmp_path / "lora.gguf", "f32")
    llm = llama_engine.open_llama(path, n_ctx=N_CTX, logits_all=True)
    ids = tokenizer.encode(prompts[1])
    ours = torch_logits(other, ids)  # the model with its LoRA layers, unmerged
    assert relative_difference(ours, llama_engine.llama_logits(llm, ids)) < F32_TOLERANCE
    fast = speed.generate_fast(other, torch.tensor([ids]), 8, 1024, eos_id=50256)
    assert llama_engine.llama_greedy(llm, ids, 8, eos_id=50256) == fast[0, len(ids) :].tolist()


def test_without_llama_cpp_it_says_what_to_install(monkeypatch, gguf_files):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what a missing package looks like
    assert llama_engine.llama_cpp_available() is False
    with pytest.raises(export.ExportError, match=r"pip install llama-cpp-python"):
        llama_engine.open_llama(gguf_files["f16"])


# -- bad input ------------------------------------------------------------------------------


def test_a_damaged_or_mismatched_pth_stops_with_course_weights_messages(tmp_path, model, cfg):
    good = tmp_path / "good-sft.pth"
    torch.save(model.state_dict(), good)
    damaged = tmp_path / "damaged-sft.pth"
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a cut-off copy
    with pytest.raises(RuntimeError, match=r"(?s)damaged or incomplete.*run notebook 05"):
        export.load_weights("offline", damaged)
    with pytest.raises(artifacts.MissingArtifact, match=r"notebook 05"):
        export.load_weights("offline", tmp_path / "missing-sft.pth")
    other = tmp_path / "other-sft.pth"
    torch.save(helpers.GPTModel({**cfg, "emb_dim": 32, "n_heads": 2}).state_dict(), other)
    with pytest.raises(ValueError, match=r"(?s)do not fit this model.*set COURSE_MODEL"):
        export.load_weights("offline", other)
    loaded = export.load_weights("offline", good)
    assert torch.equal(loaded.out_head.weight, model.out_head.weight)
    with pytest.raises(export.ExportError, match=r"no 'out_head.weight'"):
        partial = {k: v for k, v in model.state_dict().items() if k != "out_head.weight"}
        gguf_file.write_gguf(partial, cfg, tmp_path / "x.gguf")
    with pytest.raises(export.ExportError, match=r"kind 'q4'"):
        gguf_file.write_gguf(model, cfg, tmp_path / "x.gguf", kind="q4")
    assert list(tmp_path.glob("x.gguf*")) == []  # nothing half-written left


# -- the Modelfile --------------------------------------------------------------------------


def render(go_template: str, prompt: str) -> str:
    """Ollama's rendering of the template subset the course writes: `{{ .Prompt }}` only."""
    rendered = re.sub(r"\{\{-?\s*\.Prompt\s*-?\}\}", lambda _: prompt, go_template)
    assert "{{" not in rendered.replace(prompt, ""), "the template uses more than .Prompt"
    return rendered


def parse_modelfile(text: str) -> dict:
    """FROM, TEMPLATE and the PARAMETERs of a Modelfile, as Ollama's parser reads them."""
    found = {"parameters": {}}
    for match in re.finditer(r'^TEMPLATE """(.*?)"""\s*$', text, re.S | re.M):
        found["template"] = match[1]
    for line in re.sub(r'^TEMPLATE """.*?"""\s*$', "", text, flags=re.S | re.M).splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        command, _, rest = line.partition(" ")
        if command == "FROM":
            found["from"] = rest
        elif command == "PARAMETER":
            key, _, value = rest.partition(" ")
            found["parameters"].setdefault(key, []).append(json.loads(value))
        else:
            raise AssertionError(f"unexpected Modelfile line {line!r}")
    return found


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_the_modelfile_template_gives_format_input_byte_for_byte(style, data):
    text = export.modelfile("run-sft.gguf", style, 1024)
    parsed = parse_modelfile(text)
    assert parsed["from"] == "./run-sft.gguf"
    assert parsed["template"] == export.template(style)
    params = parsed["parameters"]
    assert params["temperature"] == [0] and params["top_k"] == [1]
    assert params["num_ctx"] == [1024]
    assert "<|endoftext|>" in params["stop"]
    marker = helpers.format_response({"output": ""}, style)
    entries = data[:50]
    assert any(e["input"] for e in entries) and any(not e["input"] for e in entries)
    for entry in entries:
        prompt = export.ollama_prompt(entry, style)
        if not entry["input"]:
            assert prompt == entry["instruction"]  # what a student types
        rendered = render(parsed["template"], prompt)
        assert rendered == helpers.format_input(entry, style) + marker
        assert rendered.encode("utf-8") == (helpers.format_input(entry, style) + marker).encode()


def test_a_wrong_template_fails_the_check(data):
    entry = next(e for e in data if not e["input"])
    wrong = export.template("alpaca").replace("\n\n### Instruction:", "\n### Instruction:")
    assert render(wrong, entry["instruction"]) != helpers.format_input(entry) + (
        helpers.format_response({"output": ""})
    )


# -- Ollama (the stand-in) ------------------------------------------------------------------


def call(method: str, url: str, data: bytes | None = None) -> tuple[int, bytes]:
    return ollama_registry._request(method, url, data=data)


def test_the_stand_in_checks_blob_digests_as_ollama_does(ollama_standin, gguf_files):
    base = ollama_standin.url
    data = gguf_files["q8_0"].read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert call("HEAD", f"{base}/api/blobs/{digest}")[0] == 404
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    status, body = call("POST", f"{base}/api/blobs/{wrong}", data)
    assert status == 400 and "digest mismatch" in json.loads(body)["error"]
    assert call("HEAD", f"{base}/api/blobs/{wrong}")[0] == 404
    status, body = call("POST", f"{base}/api/blobs/sha256:abc", data)
    assert status == 400 and json.loads(body)["error"] == "invalid digest format"
    assert call("POST", f"{base}/api/blobs/{digest}", data)[0] == 201
    assert call("HEAD", f"{base}/api/blobs/{digest}")[0] == 200
    assert call("POST", f"{base}/api/blobs/{digest}", data)[0] == 200  # already there


def test_create_rejects_what_ollama_rejects(ollama_standin):
    base = ollama_standin.url
    not_gguf = b"PK\x03\x04 a zip file"
    digest = "sha256:" + hashlib.sha256(not_gguf).hexdigest()
    assert call("POST", f"{base}/api/blobs/{digest}", not_gguf)[0] == 201
    with pytest.raises(export.ExportError, match="not in GGUF format"):
        ollama_registry.create_model(base, "m", {"m.gguf": digest}, "{{ .Prompt }}", {})
    missing = "sha256:" + "0" * 64
    with pytest.raises(export.ExportError, match="no such file"):
        ollama_registry.create_model(base, "m", {"m.gguf": missing}, "{{ .Prompt }}", {})
    with pytest.raises(export.ExportError, match="unknown parameter 'tempature'"):
        ollama_registry.create_model(base, "m", {"m.gguf": digest}, "t", {"tempature": 0})
    with pytest.raises(export.ExportError, match="invalid model name"):
        ollama_registry.create_model(base, "no spaces allowed", {"m.gguf": digest}, "t", {})
    names = [m["name"] for m in judge.ollama_get(base, "/api/tags")["models"]]
    assert names == ["llama3:latest"]  # nothing was created


def test_registering_the_model_puts_it_beside_the_judge(ollama_standin, gguf_files):
    statuses = ollama_registry.register_with_ollama(
        gguf_files["q8_0"], "course-offline", "alpaca", 1024
    )
    assert statuses[-1] == "success"
    sent = [r for r in ollama_standin.requests if r["path"] == "/api/create"][-1]["body"]
    assert sent["files"] == {
        gguf_files["q8_0"].name: "sha256:" + artifacts.sha256_of_file(gguf_files["q8_0"])
    }
    assert sent["template"] == export.template("alpaca")
    assert sent["parameters"] == export.ollama_parameters("alpaca", 1024)
    names = [m["name"] for m in judge.ollama_get(ollama_standin.url, "/api/tags")["models"]]
    assert names == ["llama3:latest", "course-offline:latest"]
    reply = judge.query_model("Name a color.", model="course-offline", options={})
    assert reply  # the stand-in runs no model, but answers for it
    # a second registration finds the blob there and uploads nothing
    ollama_registry.register_with_ollama(gguf_files["q8_0"], "course-offline", "alpaca", 1024)
    pushes = [r for r in ollama_standin.requests if r["method"] == "POST" and "blobs" in r["path"]]
    assert len(pushes) == 1


def test_the_ollama_check_tells_ollama_from_nothing_and_from_other_servers(
    ollama_standin, unused_port_url
):
    assert ollama_registry.ollama_version() == "0.0.0"  # OLLAMA_HOST: the stand-in
    assert ollama_registry.ollama_version(unused_port_url, timeout=2) is None  # nothing listens

    class NotOllama(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html>a web server, not Ollama</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotOllama)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert (
            ollama_registry.ollama_version(f"http://127.0.0.1:{server.server_address[1]}") is None
        )
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(judge.JudgeError, match="OLLAMA_HOST"):
        ollama_registry.ollama_version("localhost:not-a-port")


@pytest.fixture
def unused_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_the_blob_upload_streams_the_file(ollama_standin, tmp_path):
    # a file larger than one read: the stand-in hashes it in pieces, as it arrives
    big = tmp_path / "big.gguf"
    big.write_bytes(b"GGUF" + bytes(range(256)) * 12_000)
    digest = ollama_registry.push_blob(ollama_standin.url, big)
    assert digest == "sha256:" + hashlib.sha256(big.read_bytes()).hexdigest()
    request = urllib.request.Request(f"{ollama_standin.url}/api/blobs/{digest}", method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


# -- the course run -------------------------------------------------------------------------


def test_run_course_runs_notebook_11_with_bonus_or_alone():
    import run_course

    notebooks = [Path(f"{i:02d}_step.ipynb") for i in range(1, 12)]

    def numbers(**kwargs):
        return [p.name[:2] for p in run_course.select_notebooks(notebooks, **kwargs)]

    assert numbers() == [f"{i:02d}" for i in range(1, 10)]
    assert numbers(bonus=True)[-2:] == ["10", "11"]
    assert numbers(only="11") == ["11"]
    assert numbers(start="11") == ["11"]


def test_the_notebook_and_the_artifact_names_agree():
    found = sorted(Path(artifacts.settings.ROOT).glob("11_*.ipynb"))
    assert [p.stem for p in found] == [artifacts.WRITTEN_BY["sft-gguf"]]
    assert artifacts.path_for("sft-gguf", "run").name == "run-sft.gguf"
    assert artifacts.path_for("dpo-gguf", "run").name == "run-dpo.gguf"
    assert artifacts.path_for("modelfile", "run").name == "run.Modelfile"
