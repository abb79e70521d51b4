"""One config table for `python app.py` flags and `flask run` env vars."""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

import app as server


def readme_options():
    """The README's table of options: {flag: (environment variable, default as written)}."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = re.findall(r"^\| `(--[a-z-]+)` \| `(TABBYPY_[A-Z_]+)`[^|]*\|([^|]*)\|", readme, re.M)
    return {flag: (env, default.strip().strip("`")) for flag, env, default in rows}


def test_the_readme_lists_every_option_with_its_default():
    """What the README's table says, not what the config table says of itself."""
    config, table = server.load_config([], environ={}), readme_options()
    assert sorted(table) == sorted("--" + key.replace("_", "-") for key in config)
    for key, default in config.items():
        env, written = table["--" + key.replace("_", "-")]
        assert env == "TABBYPY_" + key.upper()
        if default in ("", ()):  # nothing: the README says what happens then
            assert written == "" or written.startswith(("none", "from the", "the engine's")), key
        elif isinstance(default, bool):
            assert written == str(default).lower(), key
        elif isinstance(default, (int, float)):
            assert float(written.split()[0]) == default, (key, written)
        else:
            assert written == default, key


def test_defaults_come_from_the_table():
    config = server.load_config([], environ={})
    assert (
        config["host"],
        config["port"],
        config["ctx"],
        config["max_tokens"],
        config["temperature"],
    ) == ("127.0.0.1", 8080, 4096, 64, 0.1)


def test_env_then_flags_override_with_the_defaults_types():
    env = {
        "TABBYPY_PORT": "9000",
        "TABBYPY_TEMPERATURE": "0.5",
        "TABBYPY_CLIENT_TELEMETRY": "yes",
        "TABBYPY_TOKEN": "env",
    }
    config = server.load_config(
        ["--token", "flag", "--max-tokens", "8", "--client-telemetry", "0"], environ=env
    )
    assert (
        config["port"],
        config["temperature"],
        config["token"],
        config["max_tokens"],
        config["client_telemetry"],
    ) == (9000, 0.5, "flag", 8, False)


@pytest.mark.parametrize(
    "value, expected",
    [("1", True), ("true", True), ("Yes", True), ("0", False), ("false", False), ("no", False)],
)
def test_bools(value, expected):
    assert (
        server.load_config([], environ={"TABBYPY_CLIENT_TELEMETRY": value})["client_telemetry"]
        is expected
    )


def test_unknown_env_key_fails_and_names_it():
    with pytest.raises(ValueError, match="TABBYPY_MODLE"):
        server.load_config([], environ={"TABBYPY_MODLE": "x.gguf"})


@pytest.mark.parametrize(
    "argv, env, source",
    [
        ([], {"TABBYPY_PORT": "eighty"}, "TABBYPY_PORT"),
        (["--ctx", "big"], {}, "--ctx"),
        (["--client-telemetry", "maybe"], {}, "--client-telemetry"),
    ],
)
def test_bad_values_name_the_flag_or_env_var(argv, env, source):
    with pytest.raises(ValueError, match=source):
        server.load_config(argv, environ=env)


def test_help_shows_every_knob_with_its_default_and_env_var():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "app.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for key, (default, _) in server.CONFIG.items():
        assert "--" + key.replace("_", "-") in out and "TABBYPY_" + key.upper() in out
    assert "default: 4096" in out


def test_create_app_reads_the_environment(monkeypatch, model_path, tmp_path):
    monkeypatch.setenv("TABBYPY_MODEL", model_path())
    monkeypatch.setenv("TABBYPY_ROOT", str(tmp_path))
    monkeypatch.setenv("TABBYPY_TOKEN", "s3cret")
    client = server.create_app().test_client()
    assert client.get("/v1/health").status_code == 401
    assert client.get("/v1/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"device": "tpu"}, "--device"),
        ({"max_tokens": 4096}, "--max-tokens"),
        ({"max_tokens": 0}, "--max-tokens"),
        ({"model": ""}, "--model"),
    ],
)
def test_bad_settings_stop_start_up_with_one_line(make_app, overrides, message):
    with pytest.raises(SystemExit, match=message) as e:
        make_app(**overrides)
    assert "\n" not in str(e.value.code)


def test_warns_when_serving_beyond_loopback_without_a_token(make_app, capsys):
    make_app(host="0.0.0.0")
    assert "warning: serving on 0.0.0.0 without a token" in capsys.readouterr().err
    make_app(host="0.0.0.0", token="t")
    make_app(host="127.0.0.1")
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, least", [
    ("--kv-cache-mb", "-1", 0), ("--completion-cache", "-1", 0), ("--events-days", "-1", 0),
    ("--threads", "-1", 0), ("--temperature", "-0.5", 0), ("--time-budget", "-1", 0),
    ("--max-body", "0", 1),
])  # fmt: skip
def test_a_knob_below_its_least_stops_start_up_in_one_line(flag, value, least):
    """Not a server that answers every request 413 (--max-body 0), ends every completion at its
    first line end (a negative --time-budget) or samples at a temperature no request may ask."""
    config = server.load_config(["--model", "m.gguf", f"{flag}={value}"], environ={})
    with pytest.raises(SystemExit, match=f"^error: {flag} must be {least} or more$"):
        server.check_config(config)
