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

import app as server


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


# --- Weight repacking (--repack): llama.cpp's repacking of Q4_0/Q4_K weights segfaults on some
# CPUs; --repack auto finds out in a test load in a child process before the server loads.

SETTINGS = '{"ctx": 4096, "threads": 0, "flash_attn": false, "device": "cpu"}'
# what a test load does instead when a test tells it to die: as a segfault does, with repacking
# on only (argv's last: "True" or "False"), or always by the kernel's out-of-memory killer
DIES_REPACKING = (
    "import os, signal, sys; sys.argv[-1] == 'True' and os.kill(os.getpid(), signal.SIGSEGV)"
)
DIES_ALWAYS = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"


@pytest.fixture
def q4k_model(tmp_path_factory):
    """A tiny random-weight model quantized to Q4_K_M (what the README recommends), whose Q4_K
    weights llama.cpp repacks on a CPU with AVX2."""
    import llama_cpp
    import tinymodel

    folder = tmp_path_factory.mktemp("q4k")
    f16, q4k = str(folder / "f16.gguf"), str(folder / "q4_k_m.gguf")
    tinymodel.write_model(f16, weights="random", n_embd=256, n_ff=512, n_head=4, n_head_kv=4)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(f16.encode(), q4k.encode(), params) == 0
    return q4k


def test_a_q4_k_model_completes_with_repack_auto(q4k_model, tmp_path):
    """On every CPU: where llama.cpp's repacking works, with it on and not a word; where it
    crashes (an AVX-512 Xeon with AMX), with it off and one line saying so."""
    crashes = server.trial(q4k_model, SETTINGS, True)  # a real test load, as the server's
    proc, url = start_server(["--model", q4k_model, "--root", str(tmp_path)])
    try:
        body = {"language": "python", "segments": {"prefix": "def f(a, b):\n    ", "suffix": "\n"}}
        request = urllib.request.Request(
            url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["choices"][0]["text"]
    finally:
        said = stop(proc)
    if crashes:
        assert f"repacking on {crashes}: serving with it off" in said, said
    else:
        assert "repacking" not in said, said


def test_a_test_load_that_crashes_turns_repacking_off(model_path, monkeypatch, capsys):
    monkeypatch.setattr(server, "TRIAL", DIES_REPACKING)
    server.safe_repack.cache_clear()  # (each model file is tried once a process)
    config = server.load_config(["--model", model_path()], environ={})
    llm = server.load_model(config, config["model"])
    assert llm.model_params.use_extra_bufts is False
    said = capsys.readouterr().err
    assert "repacking on died of SIGSEGV: serving with it off" in said
    assert "--repack false" in said and "--repack true" in said
    server.safe_repack.cache_clear()


@pytest.mark.parametrize("repack", ["true", "false"])
def test_repack_true_or_false_skips_the_test_load(model_path, monkeypatch, capsys, repack):
    monkeypatch.setattr(server, "TRIAL", DIES_ALWAYS)
    server.safe_repack.cache_clear()
    config = server.load_config(["--model", model_path(), "--repack", repack], environ={})
    assert server.load_model(config, config["model"]).model_params.use_extra_bufts is (
        repack == "true"
    )
    assert capsys.readouterr().err == ""


def test_a_model_whose_test_loads_all_die_ends_start_up_in_one_line(model_path, monkeypatch):
    monkeypatch.setattr(server, "TRIAL", DIES_ALWAYS)
    server.safe_repack.cache_clear()
    config = server.load_config(["--model", model_path()], environ={})
    with pytest.raises(SystemExit) as e:
        server.load_model(config, config["model"])
    server.safe_repack.cache_clear()
    message = str(e.value)
    assert message.startswith("error: --model ") and "\n" not in message
    assert "a test load died of SIGKILL (out of memory? the file is" in message


def test_a_bad_repack_value(model_path, tmp_path):
    assert_one_line_failure(
        run(["--model", model_path(), "--repack", "maybe", "--root", str(tmp_path)]),
        "--repack must be auto, true or false",
    )


def test_a_llama_cpp_library_that_cannot_load_ends_start_up_in_one_line(model_path, tmp_path):
    """As a GPU build of llama-cpp-python does on a machine without the GPU's driver."""
    (tmp_path / "libllama.so").write_bytes(b"not a library")
    result = run(
        ["--model", model_path(), "--root", str(tmp_path)], {"LLAMA_CPP_LIB_PATH": str(tmp_path)}
    )
    assert_one_line_failure(result, "llama-cpp-python cannot load llama.cpp", "driver")
