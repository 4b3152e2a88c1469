"""Writing artifacts when things go wrong, and weights files damaged on disk.

Each failure is made the way a user meets it: a disk that fills up (a small tmpfs),
a read-only folder (a read-only mount: root ignores chmod), two processes saving the
same checkpoint at once, a process killed with SIGKILL in the middle of a write, and
an offline checkpoint cut in half. The mounts happen in a private mount namespace
(`unshare -m`) of a child process, so nothing outside the test sees them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from course import artifacts, weights
from course.artifacts import write_json

ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run_on_small_disk(tmp_path: Path, script: str, prepare: str = "") -> dict:
    """Run a Python `script` with a 64 KiB tmpfs mounted at argv[1]; returns its JSON.

    `prepare` is shell run after the mount and before the script ($1 is the mount
    point). Tries a private mount namespace as root, then as a mapped root user (for
    machines where the tests do not run as root).
    """
    disk = tmp_path / "disk"
    disk.mkdir()
    shell = f'mount -t tmpfs -o size=64k tmpfs "$1" || exit\n{prepare}\necho mounted\nexec "$2" -c "$3" "$1"'
    attempts = []
    for unshare in (["unshare", "-m"], ["unshare", "-r", "-m"]):
        done = subprocess.run(
            [*unshare, "sh", "-c", shell, "sh", str(disk), sys.executable, script],
            env=child_env(COURSE_ARTIFACTS=str(disk / "artifacts")),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.stdout.startswith("mounted"):
            assert done.returncode == 0, done.stderr[-3000:]
            return json.loads(done.stdout.strip().splitlines()[-1])
        attempts.append(f"{' '.join(unshare)}: {done.stderr.strip()[-500:]}")
    pytest.fail("Could not mount a small tmpfs for the test:\n" + "\n".join(attempts))


FULL_DISK = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from course import artifacts

    folder = artifacts.artifacts_dir()
    log = artifacts.path_for("training-log", "offlinetiny")
    checkpoint = artifacts.path_for("checkpoint", "offlinetiny")
    artifacts.write_json(log, {"val_losses": [1.0]})
    result = {}
    # a 400 KB checkpoint on a disk with 64 KB
    try:
        artifacts.torch_save({"w": torch.zeros(100_000)}, checkpoint)
    except Exception as exc:
        result["torch_save"] = [isinstance(exc, artifacts.ArtifactError), str(exc)]
    try:
        artifacts.write_json(log, {"val_losses": [2.0] * 50_000})
    except Exception as exc:
        result["write_json"] = [isinstance(exc, artifacts.ArtifactError), str(exc)]
    result["files"] = sorted(os.listdir(folder))
    result["log"] = artifacts.read_json(log)
    # the space of the failed writes is free again
    artifacts.write_json(log, {"val_losses": [3.0] * 2000})
    result["after"] = artifacts.read_json(log)["val_losses"][0]
    print(json.dumps(result))
    """
)


def test_a_full_disk_gives_a_clear_message_and_leaves_nothing_behind(tmp_path):
    result = run_on_small_disk(tmp_path, FULL_DISK)
    for call in ("torch_save", "write_json"):
        clear, message = result[call]
        assert clear, message
        assert "the disk is full" in message and "COURSE_ARTIFACTS" in message, message
    assert "offlinetiny-train-checkpoint.pth" in result["torch_save"][1]
    assert result["files"] == ["offlinetiny-training-log.json"]  # no .tmp, no half checkpoint
    assert result["log"] == {"val_losses": [1.0]}  # the old file is whole
    assert result["after"] == 3.0


READ_ONLY = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from course import artifacts

    disk = sys.argv[1]
    log = artifacts.path_for("training-log", "offlinetiny")
    result = {}
    for name, write in [
        ("write_json", lambda: artifacts.write_json(log, {"val_losses": [2.0]})),
        ("torch_save", lambda: artifacts.torch_save({"w": torch.ones(3)}, log.with_suffix(".pth"))),
    ]:
        try:
            write()
        except Exception as exc:
            result[name] = [isinstance(exc, artifacts.ArtifactError), str(exc)]
    os.environ["COURSE_ARTIFACTS"] = os.path.join(disk, "artifacts", "new-run")
    try:
        artifacts.artifacts_dir()
    except Exception as exc:
        result["artifacts_dir"] = [isinstance(exc, artifacts.ArtifactError), str(exc)]
    result["log"] = artifacts.read_json(log)
    print(json.dumps(result))
    """
)


def test_a_read_only_artifacts_folder_gives_a_clear_message(tmp_path):
    prepare = (
        'mkdir "$1/artifacts" && echo \'{"val_losses": [1.0]}\' '
        '> "$1/artifacts/offlinetiny-training-log.json" && mount -o remount,ro "$1"'
    )
    result = run_on_small_disk(tmp_path, READ_ONLY, prepare)
    for call in ("write_json", "torch_save"):
        clear, message = result[call]
        assert clear, message
        assert "is not writable" in message and "COURSE_ARTIFACTS" in message, message
    clear, message = result["artifacts_dir"]
    assert clear and "cannot be created" in message, message
    assert result["log"] == {"val_losses": [1.0]}


SAVER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from course import artifacts

    path, value, go = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    state = {"w": torch.full((250_000,), value), "step": torch.tensor(int(value))}
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    for _ in range(20):
        artifacts.torch_save(state, path)
    """
)


def test_two_processes_saving_the_same_checkpoint(tmp_path):
    path, go = tmp_path / "model-train-checkpoint.pth", tmp_path / "go"
    savers = [
        subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path), value, str(go)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for value in ("1", "2")
    ]
    for saver in savers:  # both have imported torch: start them together
        assert saver.stdout.readline().strip() == "ready"
    go.touch()
    for saver in savers:
        _, stderr = saver.communicate(timeout=120)
        assert saver.returncode == 0, stderr[-3000:]
    state = torch.load(path, weights_only=True)
    value = float(state["step"])
    assert value in (1.0, 2.0)
    assert torch.equal(state["w"], torch.full((250_000,), value))  # one of the two, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", path.name]


STUCK_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from course import artifacts

    def fsync(fd):  # the bytes are written; hold here until killed
        print("writing", flush=True)
        time.sleep(600)

    os.fsync = fsync
    artifacts.write_json(sys.argv[1], {"responses": ["x" * 1000] * 100})
    """
)


def test_a_write_killed_half_way_leaves_nothing_after_the_next_write(tmp_path):
    path = tmp_path / "offlinetiny-instruction-data-with-response.json"
    writer = subprocess.Popen(
        [sys.executable, "-c", STUCK_WRITER, str(path)],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        (left,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        # a writer that still runs keeps its temporary file
        write_json(path, {"responses": ["first"]})
        assert left.exists()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert left.exists()  # what kill -9 leaves
    write_json(path, {"responses": ["second"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert artifacts.read_json(path) == {"responses": ["second"]}


def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "offlinetiny-training-log.json"
    write_json(path, {"old": True})
    with pytest.raises(KeyboardInterrupt):  # Ctrl+C half-way through a write
        with artifacts.open_atomic(path) as f:
            f.write(b'{"new": ')
            raise KeyboardInterrupt
    assert artifacts.read_json(path) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# -- weights files damaged on disk ------------------------------------------------------


def flat(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in params.items():
        if key == "blocks":
            for i, block in enumerate(value):
                out.update(flat(block, f"{prefix}h{i}/"))
        elif isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def assert_same_params(a: dict, b: dict) -> None:
    a, b = flat(a), flat(b)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_cut_off_offline_tensorflow_checkpoint_is_written_anew(tmp_path, capsys):
    settings, params = weights.load_gpt2("offline", tmp_path, source="tensorflow")
    data_file = tmp_path / "offline" / "model.ckpt.data-00000-of-00001"
    size = data_file.stat().st_size
    with open(data_file, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    for _ in range(2):  # and again: nothing damaged is kept
        settings_again, params_again = weights.load_gpt2("offline", tmp_path, source="tensorflow")
        assert settings_again == settings
        assert_same_params(params_again, params)
        assert data_file.stat().st_size == size
        out = capsys.readouterr().out
        if _ == 0:
            assert "model.ckpt" in out and "are damaged" in out and "Writing them anew" in out
        else:
            assert "damaged" not in out

    # a real download cut off the same way: nothing to rewrite, so say what to do
    real = tmp_path / "124M"
    real.mkdir()
    for name in weights.GPT2_FILES:
        (real / name).write_bytes((tmp_path / "offline" / name).read_bytes())
    with open(real / "model.ckpt.data-00000-of-00001", "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(weights.DamagedCheckpoint) as caught:
        weights.load_gpt2("124M", tmp_path, source="tensorflow")
    assert f"delete the folder {real}" in str(caught.value)
    assert "Read less bytes" in str(caught.value)


def test_a_cut_off_offline_safetensors_checkpoint_is_written_anew(tmp_path, capsys):
    _, params = weights.load_gpt2("offline", tmp_path, source="safetensors")
    for name in ("model.safetensors", "config.json"):
        target = tmp_path / "offline" / name
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        capsys.readouterr()
        _, params_again = weights.load_gpt2("offline", tmp_path, source="safetensors")
        assert_same_params(params_again, params)
        assert "Writing them anew" in capsys.readouterr().out, name
