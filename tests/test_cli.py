"""Real processes: both ways to run the server, and start-up failures that end in one clear line."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, free_port, start_server, stop, wait_for_health


def run(args, env=None, timeout=120):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TABBYPY_", "HF_"))},
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "app.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def assert_one_line_failure(result, *words, only_line=True):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 or not only_line, result.stderr
    assert lines[-1].startswith("error: ")
    for word in words:
        assert word in lines[-1]


def test_no_model(tmp_path):
    assert_one_line_failure(run(["--root", str(tmp_path)]), "--model", "TABBYPY_MODEL")


def test_missing_model_file(tmp_path):
    assert_one_line_failure(
        run(["--model", str(tmp_path / "nope.gguf"), "--root", str(tmp_path)]), "no such file"
    )


@pytest.mark.parametrize(
    "content", [b"", b"GGUF" + os.urandom(4000), b"not a model at all\n" * 100]
)
def test_corrupt_model_file(tmp_path, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    assert_one_line_failure(
        run(["--model", str(path), "--root", str(tmp_path)]), str(path), "cannot load"
    )


def test_fim_template_on_a_model_without_fim(model_path, tmp_path):
    result = run(
        [
            "--model",
            model_path("plain"),
            "--root",
            str(tmp_path),
            "--prompt-template",
            "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",
        ]
    )
    assert_one_line_failure(result, "--prompt-template", "<fim_prefix>")


def test_gpu_without_a_gpu_build(model_path, tmp_path):
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python has a GPU backend")
    assert_one_line_failure(
        run(["--model", model_path(), "--root", str(tmp_path), "--device", "gpu"]), "--device gpu"
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["--port", "http"], ["--port"]),
        (["--ctx", "100", "--max-tokens", "200"], ["--max-tokens"]),
    ],
)
def test_bad_flags(model_path, tmp_path, args, words):
    assert_one_line_failure(run(["--model", model_path(), "--root", str(tmp_path), *args]), *words)


def test_unknown_env_var(model_path, tmp_path):
    assert_one_line_failure(
        run(["--root", str(tmp_path)], env={"TABBYPY_MODLE": model_path()}), "TABBYPY_MODLE"
    )


def test_hub_id_without_huggingface_hub(tmp_path):
    # a stand-in package that fails to import, as on a machine without huggingface_hub
    (tmp_path / "huggingface_hub").mkdir()
    (tmp_path / "huggingface_hub" / "__init__.py").write_text(
        "raise ImportError('No module named huggingface_hub')\n"
    )
    result = run(
        ["--model", "TabbyML/StarCoder-1B", "--root", str(tmp_path)],
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert_one_line_failure(result, "TabbyML/StarCoder-1B", "pip install huggingface_hub")


OFFLINE = ("HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE")
NO_HUB = ("cannot reach the Hugging Face hub", "HF_HUB_OFFLINE=1")


@pytest.mark.parametrize(
    "model, env, url, says",
    [
        ("TabbyML/StarCoder-1B", {"HF_HUB_OFFLINE": "1"},
         "https://huggingface.co/TabbyML/StarCoder-1B/resolve/main/ggml/model-00001-of-00001.gguf",
         OFFLINE),
        ("owner/repo:model-q8_0.gguf", {"HF_HUB_OFFLINE": "1"},
         "https://huggingface.co/owner/repo/resolve/main/model-q8_0.gguf", OFFLINE),
        ("owner/repo:model-q8_0.gguf", {"HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing listens
         "http://127.0.0.1:9/owner/repo/resolve/main/model-q8_0.gguf", NO_HUB),
        ("owner/repo", {"HF_ENDPOINT": "https://hub.invalid"},  # no such name
         "https://hub.invalid/owner/repo/tree/main", NO_HUB),
    ],
)  # fmt: skip
def test_a_hub_id_without_network_fails_fast_and_says_what_to_do(tmp_path, model, env, url, says):
    import huggingface_hub  # noqa: F401 (in tests/requirements.txt)

    started = time.monotonic()
    result = run(
        ["--model", model], env={"HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), **env}
    )
    assert time.monotonic() - started < 15  # huggingface_hub alone retried for about 30 s
    assert_one_line_failure(result, model, url, "--model ./model.gguf", *says)
    assert os.listdir(tmp_path) == []  # a failed start leaves nothing behind (no ~/.tabby)


def test_a_hub_id_in_the_cache_starts_without_the_hub(tmp_path, model_path):
    """owner/repo with no file named, already downloaded: its one GGUF file, with no network."""
    import huggingface_hub  # noqa: F401 (in tests/requirements.txt)

    repo = tmp_path / "hf" / "hub" / "models--owner--repo"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    shutil.copy(model_path(), repo / "snapshots" / ("0" * 40) / "model-q8_0.gguf")
    env = {"HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    for extra in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}):
        proc, _ = start_server(["--model", "owner/repo", "--events", "off"], env={**env, **extra})
        assert "model owner/repo: FIM template" in stop(proc)


def test_a_failed_start_leaves_no_files(tmp_path, model_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    home = tmp_path / "home"
    home.mkdir()
    for args in (["--model", str(tmp_path / "nope.gguf")], ["--backend", "http://127.0.0.1:9/v1"],
                 ["--model", model_path("plain"), "--prompt-template", "<fim_prefix>{prefix}"],
                 ["--model", model_path(), "--repo", str(tmp_path / "missing")],
                 ["--model", model_path(), "--repo", str(plain)],  # not a git checkout
                 ["--model", model_path(), "--repo", f"file://{tmp_path}/missing.git"],
                 ["--model", model_path(), "--port", str(taken.getsockname()[1])]):  # fmt: skip
        assert run(args, env={"HOME": str(home)}).returncode != 0
        assert os.listdir(home) == [], args
    taken.close()


def test_python_app_py_serves(model_path, tmp_path):
    proc, url = start_server(["--model", model_path(), "--root", str(tmp_path)])
    try:
        body = json.dumps(
            {"language": "python", "segments": {"prefix": "def f(a, b):\n    "}}
        ).encode()
        req = urllib.request.Request(
            url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.load(r)["choices"][0]["text"] == "total = a + b\n    return total"
    finally:
        out = stop(proc)
    assert "FIM template" in out


def test_flask_run_serves_with_env_config(model_path, tmp_path):
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TABBYPY_")},
        "TABBYPY_MODEL": model_path(),
        "TABBYPY_ROOT": str(tmp_path),
        "TABBYPY_TOKEN": "s3cret",
    }
    log = open(tmp_path / "flask.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flask", "run", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(proc, url, 60)
        req = urllib.request.Request(url + "/v1/health", headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.load(r)["model"].endswith(".gguf")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/v1/health", timeout=10)
        assert e.value.code == 401
    finally:
        stop(proc)
