"""download_and_load_gpt2 against a real HTTP server on 127.0.0.1.

The server serves the offline checkpoint's seven files as if they were GPT-2 124M,
so a finished download also loads (through TensorFlow) like a real one.
"""

from __future__ import annotations

import re

import pytest
from gpt2_fixtures import offline_gpt2_files  # noqa: F401
from http_fixtures import FileServer, closed_port_url, no_proxy  # noqa: F401

import helpers
from course.weights import load_gpt2

SIZE = "124M"
BIG = "model.ckpt.data-00000-of-00001"


@pytest.fixture
def served(offline_gpt2_files, no_proxy) -> dict[str, bytes]:  # noqa: F811
    """The seven files under the URL paths a GPT-2 download asks for."""
    return {f"/gpt-2/models/{SIZE}/{name}": data for name, data in offline_gpt2_files.items()}


def path_of(name: str) -> str:
    return f"/gpt-2/models/{SIZE}/{name}"


def download(tmp_path, base_url: str, backup_base_url: str):
    """OpenAI's TensorFlow files only: the safetensors fallback has tests of its own."""
    return load_gpt2(
        SIZE,
        tmp_path,
        base_url=base_url + "/gpt-2/models",
        backup_base_url=backup_base_url,
        source="tensorflow",
        safetensors_base_url=closed_port_url(),  # never the real Hugging Face
    )


def assert_complete(model_dir, offline_gpt2_files):  # noqa: F811
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(helpers.GPT2_FILES)
    for name, data in offline_gpt2_files.items():
        assert (model_dir / name).read_bytes() == data, name


def test_normal_download(tmp_path, served, offline_gpt2_files, capsys):  # noqa: F811
    with FileServer(served) as server:
        settings, params = download(tmp_path, server.url, closed_port_url())
        for name in helpers.GPT2_FILES:
            assert server.requests_for(path_of(name)) == [
                {"path": path_of(name), "range": None, "status": 200}
            ]
    assert_complete(tmp_path / SIZE, offline_gpt2_files)
    assert settings["n_layer"] == 2 and settings["n_embd"] == 64
    assert params["wte"].shape == (50257, 64)
    assert len(params["blocks"]) == 2

    # one progress bar per file, finished (tqdm writes to stderr)
    err = capsys.readouterr().err
    for name in helpers.GPT2_FILES:
        assert name in err, err
    assert re.search(rf"{re.escape(BIG)}: 100%", err), err


def test_complete_files_are_skipped(tmp_path, served, offline_gpt2_files):  # noqa: F811
    with FileServer(served) as server:
        download(tmp_path, server.url, closed_port_url())
        assert len(server.requests) == 7
        _, params = download(tmp_path, server.url, closed_port_url())
        assert len(server.requests) == 7, "complete files must not be downloaded again"
    assert params["wte"].shape == (50257, 64)


def test_files_already_there_are_not_requested(tmp_path, served, offline_gpt2_files):  # noqa: F811
    model_dir = tmp_path / SIZE
    model_dir.mkdir()
    for name in ("hparams.json", "vocab.bpe", BIG):
        (model_dir / name).write_bytes(offline_gpt2_files[name])
    with FileServer(served) as server:
        download(tmp_path, server.url, closed_port_url())
        requested = sorted(r["path"].rsplit("/", 1)[1] for r in server.requests)
    assert requested == sorted(set(helpers.GPT2_FILES) - {"hparams.json", "vocab.bpe", BIG})
    assert_complete(model_dir, offline_gpt2_files)


def test_cut_off_download_resumes(tmp_path, served, offline_gpt2_files):  # noqa: F811
    model_dir = tmp_path / SIZE
    size = len(offline_gpt2_files[BIG])
    with FileServer(served, cut_once=(path_of(BIG),)) as server:
        # first run: the connection drops halfway through the big file, and the
        # backup is unreachable, so the run stops with an error naming the file
        with pytest.raises(ConnectionError) as info:
            download(tmp_path, server.url, closed_port_url())
        message = str(info.value)
        assert BIG in message and "1 of the GPT-2" in message
        assert not (model_dir / BIG).exists(), "an incomplete file must not get its final name"
        part = model_dir / (BIG + ".part")
        assert part.stat().st_size == size // 2
        assert part.read_bytes() == offline_gpt2_files[BIG][: size // 2]
        others = [n for n in helpers.GPT2_FILES if n != BIG]
        assert all((model_dir / n).is_file() for n in others)

        # second run: only the rest of the big file is asked for
        settings, _ = download(tmp_path, server.url, closed_port_url())
        requests = server.requests_for(path_of(BIG))
        assert [r["range"] for r in requests] == [None, f"bytes={size // 2}-"]
        assert [r["status"] for r in requests] == [200, 206]
        for name in others:
            assert len(server.requests_for(path_of(name))) == 1, name
    assert_complete(model_dir, offline_gpt2_files)
    assert settings["n_vocab"] == 50257


def test_resume_from_backup_in_the_same_run(tmp_path, served, offline_gpt2_files):  # noqa: F811
    size = len(offline_gpt2_files[BIG])
    with (
        FileServer(served, cut_once=(path_of(BIG),)) as primary,
        FileServer(served) as backup,
    ):
        download(tmp_path, primary.url, backup.url + "/gpt-2/models")
        assert [r["status"] for r in primary.requests_for(path_of(BIG))] == [200]
        # the backup continues the file the primary left half done
        assert backup.requests == [
            {"path": path_of(BIG), "range": f"bytes={size // 2}-", "status": 206}
        ]
    assert_complete(tmp_path / SIZE, offline_gpt2_files)


def test_server_ignoring_range_restarts_the_file(tmp_path, served, offline_gpt2_files):  # noqa: F811
    model_dir = tmp_path / SIZE
    model_dir.mkdir()
    (model_dir / (BIG + ".part")).write_bytes(b"stale bytes that must not survive")
    with FileServer(served, honor_range=False) as server:
        download(tmp_path, server.url, closed_port_url())
        (request,) = server.requests_for(path_of(BIG))
    assert request["range"] == f"bytes={len(b'stale bytes that must not survive')}-"
    assert request["status"] == 200
    assert_complete(model_dir, offline_gpt2_files)


def test_part_file_already_complete(tmp_path, served, offline_gpt2_files):  # noqa: F811
    # stopped after the last byte but before the rename: the server answers 416
    model_dir = tmp_path / SIZE
    model_dir.mkdir()
    (model_dir / (BIG + ".part")).write_bytes(offline_gpt2_files[BIG])
    with FileServer(served) as server:
        download(tmp_path, server.url, closed_port_url())
        assert [r["status"] for r in server.requests_for(path_of(BIG))] == [416]
    assert_complete(model_dir, offline_gpt2_files)


@pytest.mark.parametrize("failure", ["http-500", "connection-refused"])
def test_backup_when_primary_fails(tmp_path, served, offline_gpt2_files, failure):  # noqa: F811
    with FileServer(served, fail_status=500) as broken, FileServer(served) as backup:
        primary_url = broken.url if failure == "http-500" else closed_port_url()
        download(tmp_path, primary_url, backup.url + "/gpt-2/models")
        assert len(backup.requests) == 7
        assert all(r["status"] == 200 for r in backup.requests)
        if failure == "http-500":
            assert len(broken.requests) == 7
            assert all(r["status"] == 500 for r in broken.requests)
    assert_complete(tmp_path / SIZE, offline_gpt2_files)


def test_both_sources_fail(tmp_path, served):
    model_dir = tmp_path / SIZE
    with FileServer(served, fail_status=500) as broken:
        with pytest.raises(ConnectionError) as info:
            download(tmp_path, broken.url, closed_port_url())
        assert len(broken.requests) == 7
    message = str(info.value)
    assert "7 of the GPT-2 124M files" in message
    for name in helpers.GPT2_FILES:
        assert name in message, message
    assert f"Put these files into {model_dir.resolve()}" in message
    assert "HTTP 500" in message and "refused" in message
    assert not any(model_dir.glob("model.ckpt*")), "nothing half-written may be left"


def test_only_missing_files_are_named(tmp_path, served, offline_gpt2_files):  # noqa: F811
    model_dir = tmp_path / SIZE
    model_dir.mkdir()
    present = [n for n in helpers.GPT2_FILES if n not in ("hparams.json", "vocab.bpe")]
    for name in present:
        (model_dir / name).write_bytes(offline_gpt2_files[name])
    with pytest.raises(ConnectionError) as info:
        download(tmp_path, closed_port_url(), closed_port_url())
    message = str(info.value)
    assert "2 of the GPT-2 124M files" in message
    named = {line.split()[0] for line in message.splitlines() if line.startswith("  ")}
    assert named == {"hparams.json", "vocab.bpe"}
