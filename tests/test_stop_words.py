"""Tabby's stop words, language by language, as the server applies them: /v1/completions in front
of a stub engine that writes what each probe needs, the answer compared with what a Tabby server
answers for the same stream (tabby_reference: Tabby's languages.toml and its stop condition,
sharing nothing with app.py). A keyword dropped from the server's table, one too many, a wrong
comment marker or a wrong default each change some answer here."""

import http.server
import json
import threading

import pytest
import tabby_reference as tabby

import app as server

TEMPLATE = "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
PROMPT = TEMPLATE.format(prefix="", suffix="")  # an empty document: nothing but stop words cuts
# language ids Tabby's table does not have: its UNKNOWN_LANGUAGE, which stops at any newline
UNKNOWN = ["json", "yaml", "plaintext", "unknown", "Python", "shell"]
# comment markers of languages in the table and out of it (OCaml's, SQL's, Lisp's, ...)
COMMENTS = ["#", "//", "--", "(*", "/*", "*", "%", ";", "'", "<!--", "REM", "!"]
# every line that begins a stop word somewhere (or could), and special tokens of other formats
# than those Tabby stops at: a language must not stop at those that are not its own
LINES = sorted(
    {"\n" + word for _, _, words in tabby.LANGUAGES for word in words}
    | {"\n" + comment for comment in COMMENTS}
    | {"\n"}
)
ALL_DEFAULTS = ["python", "css", "json"]  # languages whose probes have every default stop word
OTHER_SPECIALS = ["<|endoftext|>", "<|file_sep|>", "<｜fim▁begin｜>", "<PRE>", "</s>", "[PREFIX]"]


class Engine(http.server.BaseHTTPRequestHandler):
    """llama-server's /completion, streaming server.pieces, one event each."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in self.server.pieces:
            self.wfile.write(b"data: " + json.dumps({"content": piece, "stop": False}).encode())
            self.wfile.write(b"\n\n")
        self.wfile.write(b'data: {"content": "", "stop": true}\n\n')

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def ask(tmp_path_factory):
    """ask(language, pieces) -> the text the server answers when the engine streams pieces."""
    engine = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    engine.daemon_threads = True
    threading.Thread(target=engine.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{engine.server_address[1]}/completion"
    root = tmp_path_factory.mktemp("stops")
    config = server.load_config(
        ["--backend", url, "--prompt-template", TEMPLATE, "--root", str(root), "--events", "off",
         "--completion-cache", "0", "--time-budget", "0", "--max-tokens", "1000"],
        environ={},
    )  # fmt: skip
    app = server.create_app(config)
    app.config["TESTING"] = True
    client = app.test_client()

    def ask(language, pieces):
        engine.pieces = pieces
        body = {"language": language, "segments": {"prefix": "", "suffix": ""}}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.get_data(as_text=True)
        return r.get_json()["choices"][0]["text"]

    yield ask
    engine.shutdown()
    engine.server_close()


def probes(language):
    """Streams (lists of pieces) that tell the language's stop words apart: each stop word between
    two words, as one piece, as a tokenizer gives it (the defaults, the same in every language,
    in a few); then one of every other language's stop words (and other formats' special
    tokens) that must all come through."""
    words = tabby.stop_words(language)
    own = words[len(tabby.DEFAULT_STOP_WORDS) :]
    defaults = tabby.DEFAULT_STOP_WORDS if language in ALL_DEFAULTS else ["\n\n"]
    for word in dict.fromkeys(defaults + own):  # (Rust lists "trait" twice)
        yield ["x", word, "y"]
    lines = [line + " y" for line in LINES if not any(w in "x" + line + " y" for w in words)]
    yield ["x"] + lines + [" " + special for special in OTHER_SPECIALS]


@pytest.mark.parametrize("language", tabby.LANGUAGE_IDS + UNKNOWN)
def test_the_server_stops_where_tabby_stops(ask, language):
    *stopped, passed = probes(language)
    expected = [tabby.decode(pieces, language, PROMPT) for pieces in stopped + [passed]]
    assert set(expected[:-1]) == {"x"} and expected[-1] == "".join(passed)  # (the probes' point)
    answers = [ask(language, pieces) for pieces in stopped + [passed]]
    wrong = [(pieces, got) for pieces, got, want in zip(stopped + [passed], answers, expected)
             if got != want]  # fmt: skip
    assert not wrong, wrong
    assert len(passed) > 10 or language not in tabby.LANGUAGE_IDS  # many lines came through


def test_the_reference_is_tabbys_table():
    """tabby_reference's table, checked at a few points by hand against languages.toml."""
    assert len(tabby.LANGUAGES) == 33 and len(tabby.LANGUAGE_IDS) == 37
    assert tabby.stop_words("python")[-5:] == ["\n#", "\ndef", "\nfrom", "\nclass", "\nimport"]
    assert tabby.stop_words("lua")[28] == "\n--" and tabby.stop_words("ocaml")[28] == "\nand"
    assert tabby.stop_words("css") == tabby.DEFAULT_STOP_WORDS
    assert tabby.stop_words("json") == tabby.DEFAULT_STOP_WORDS + ["\n"]
    assert len(tabby.DEFAULT_STOP_WORDS) == 28


def test_every_comment_marker_of_the_table_is_probed():
    assert {c for _, c, _ in tabby.LANGUAGES if c is not None} <= set(COMMENTS)
