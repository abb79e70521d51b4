"""A Tabby-compatible code-completion server in one file: Flask + llama-cpp-python.

It speaks TabbyML Tabby's HTTP API (/v1/health, /v1/completions, /v1/events,
/v1beta/server_setting), so the Tabby extensions for VS Code, Vim and IntelliJ (all of
them run the tabby-agent client) get fill-in-the-middle completions from a local GGUF model,
or from an inference engine elsewhere (llama-server, vLLM, Ollama) that generates for it.

    python app.py --model ./model.gguf --port 8080
    TABBYPY_MODEL=./model.gguf flask run --port 8080
    python app.py --backend http://gpu-box:8000/v1 --backend-model Qwen/Qwen2.5-Coder-7B

`python app.py --help` lists every option with its environment variable.
"""
import argparse
import collections
import concurrent.futures
import ctypes
import functools
import hmac
import http.client
import itertools
import json
import logging
import math
import os
import platform
import re
import select
import socket
import sys
import threading
import time
import urllib.parse
import uuid

# llama.cpp's OpenMP workers spin on a core for a while after each generation (libgomp's default);
# on a small CPU that core is then missing for the request around it: 10,000 spins measured ~0.5
# ms less per request, the model no slower. Read when libgomp loads, hence here; yours wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
try:
    import llama_cpp
except ImportError:  # a local model needs it (load_model says so); --backend does not
    llama_cpp = None
from flask import Flask, abort, jsonify, request  # noqa: E402
from werkzeug.exceptions import HTTPException  # noqa: E402

# -----------------------------------------------------------------------------
# Config: the only place knobs live. Each is a flag --key-name and an env var TABBYPY_KEY_NAME.

ENV_PREFIX = "TABBYPY_"
CONFIG = {
    "model": ("", "GGUF file, or a Hugging Face repo id (owner/repo or owner/repo:file.gguf), downloaded once"),
    "backend": ("", "URL of an inference engine to generate with instead of --model: llama-server (.../completion), "
                    "an OpenAI-style server such as vLLM (.../v1) or Ollama (.../api/generate)"),
    "backend_kind": ("", "llama.cpp, openai or ollama; empty: told by the --backend URL's path"),
    "backend_model": ("", "model name sent to the engine, and which picks the FIM template; empty: the engine's first (llama.cpp, openai)"),
    "backend_token": ("", "bearer token sent to the engine"),
    "backend_timeout": (10.0, "seconds to wait for the engine to connect or send its next piece; then 504"),
    "prompt_template": ("", "FIM template in Tabby's syntax, e.g. '<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>'; empty: from the model's tokens (--backend: its name)"),
    "chat_model": ("", "instruct model for /v1/chat/completions: GGUF file, Hugging Face repo id, or 'same' (--model, if it has "
                       "a chat template); with --backend, the engine's model name ('same': --backend-model). Empty: no chat"),
    "chat_template": ("", "Jinja2 chat template, for a chat model without one in its GGUF metadata"),
    "device": ("cpu", "cpu, or gpu to offload every layer (llama-cpp-python must be built with a GPU backend)"),
    "ctx": (4096, "context size in tokens: prompt and completion together"),
    "threads": (0, "CPU threads; 0: one per physical core"),
    "max_tokens": (64, "most tokens generated per completion (Tabby's max_decoding_tokens)"),
    "temperature": (0.1, "sampling temperature when a request sends none; 0 is greedy"),
    "time_budget": (1000, "ms of generation after which a completion ends at the next line end (llama-server's t_max_predict_ms); 0: none"),
    "token": ("", "bearer token every /v1 and /v1beta request must carry; empty: no auth"),
    "root": ("~/.tabby", "data directory: events go to ROOT/events/YYYY-MM-DD.json, as Tabby writes them"),
    "max_body": (1 << 20, "largest request body in bytes; larger ones get 413"),
    "client_telemetry": (False, "let tabby-agent send its anonymous usage statistics to TabbyML"),
    "host": ("127.0.0.1", "address to listen on (python app.py only; flask run has --host)"),
    "port": (8080, "port to listen on (python app.py only; flask run has --port)"),
}


def convert(value, default, source):
    """A flag or env string as the type of the knob's default; source names it in errors."""
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"{source} must be true or false, not {value!r}")
    try:
        return type(default)(value)
    except ValueError:
        raise ValueError(f"{source} must be a{'n' if type(default) is int else ''} {type(default).__name__}, not {value!r}") from None


def load_config(argv=(), environ=None):
    """CONFIG's defaults, overlaid by TABBYPY_* environment variables, then by --flags."""
    environ = os.environ if environ is None else environ
    for name in environ:
        if name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX):].lower() not in CONFIG:
            raise ValueError(f"unknown setting {name} (see --help)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    config = {}
    for key, (default, help) in CONFIG.items():
        env = ENV_PREFIX + key.upper()
        parser.add_argument("--" + key.replace("_", "-"), dest=key, metavar="VALUE",
                            help=f"{help} (default: {default!r}; env {env})")
        config[key] = convert(environ[env], default, env) if env in environ else default
    for key, value in vars(parser.parse_args(list(argv))).items():
        if value is not None:
            config[key] = convert(value, CONFIG[key][0], "--" + key.replace("_", "-"))
    return config

# -----------------------------------------------------------------------------
# Data tables, in Tabby's own shapes so they can be diffed against upstream.

# The Tabby release whose API we speak: tabby-agent reads version.git_describe as a semver
# and asks for /v1beta/server_setting only from 0.9.0 on.
TABBY_VERSION = "v0.32.0"

# FIM prompt templates (TabbyML/registry-tabby:models.json), tried in order: the first whose
# markers are all special tokens of the model wins. A remote engine's model has no tokens to
# look at: there the first template with a fragment of its (lowercased) model name wins.
FIM_TEMPLATES = {
    "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>": ["starcoder", "codeqwen", "granite", "stable-code"],
    "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>": ["codegemma", "qwen2.5-coder", "qwen3-coder"],
    "<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>": ["deepseek-coder"],
    "<PRE> {prefix} <SUF>{suffix} <MID>": ["codellama", "code-llama"],
    "[SUFFIX]{suffix}[PREFIX]{prefix}": ["codestral"],  # suffix first, no middle token
}
# a special-token marker inside a template: <...> or [UPPER]
MARKER = r"<[^\s<>{}]+>|\[[A-Z]+\]"

# TabbyML/tabby:crates/tabby-common/assets/languages.toml. line_comment None: the language has
# none, so context snippets are left out. Each top-level keyword becomes the stop word "\n" + kw.
LANGUAGES = [
    {"languages": ["python"], "line_comment": "#", "top_level_keywords": ["def", "from", "class", "import"]},
    {"languages": ["rust"], "line_comment": "//", "top_level_keywords": ["fn", "trait", "impl", "enum", "pub", "extern", "static", "trait", "unsafe", "use"]},
    {"languages": ["java"], "line_comment": "//", "top_level_keywords": ["abstract", "public", "private", "class", "const", "exports", "extends", "implements", "static", "import", "interface", "module", "package", "var", "enum", "return"]},
    {"languages": ["kotlin"], "line_comment": "//", "top_level_keywords": ["abstract", "public", "private", "companion", "class", "data", "const", "actual", "expect", "sealed", "suspend", "fun", "import", "interface", "package", "var", "val", "enum"]},
    {"languages": ["javascript-typescript", "javascript", "typescript", "javascriptreact", "typescriptreact"], "line_comment": "//",
     "top_level_keywords": ["abstract", "async", "class", "const", "export", "function", "interface", "module", "package", "type", "var", "enum", "let"]},
    {"languages": ["go"], "line_comment": "//", "top_level_keywords": ["func", "interface", "struct", "package", "type", "import", "var", "const"]},
    {"languages": ["ruby"], "line_comment": "#", "top_level_keywords": ["begin", "class", "def", "end", "ensure", "include", "module", "require", "rescue", "self"]},
    {"languages": ["c"], "line_comment": "//", "top_level_keywords": ["const", "enum", "extern", "inline", "register", "static", "struct", "typedef", "union", "volatile"]},
    {"languages": ["cpp"], "line_comment": "//", "top_level_keywords": ["auto", "class", "const", "concept", "enum", "extern", "inline", "namespace", "register", "static", "struct", "template", "typedef", "union", "volatile"]},
    {"languages": ["csharp"], "line_comment": "//", "top_level_keywords": ["class", "struct", "enum", "interface", "abstract", "static", "extern", "namespace", "using", "var", "dynamic", "async"]},
    {"languages": ["php"], "line_comment": "//", "top_level_keywords": ["abstract", "class", "const", "declare", "extends", "final", "finally", "function", "global", "implements", "include_once", "include", "interface", "namespace", "private", "protected", "public", "require_once", "require", "static", "trait", "use"]},
    {"languages": ["solidity"], "line_comment": "//", "top_level_keywords": ["contract", "interface", "error", "library", "struct", "enum", "function", "type"]},
    {"languages": ["dart"], "line_comment": "//", "top_level_keywords": ["abstract", "class", "late", "var", "final", "const", "export", "interface", "type", "enum", "int", "String", "double", "DateTime", "typedef"]},
    {"languages": ["elixir"], "line_comment": "#", "top_level_keywords": ["def", "defp", "defmacro", "defmacrop", "module", "use", "import", "alias", "require", "if", "unless", "case", "cond", "with", "try", "catch", "throw", "receive", "after", "do", "end"]},
    {"languages": ["r"], "line_comment": "#", "top_level_keywords": ["function", "library", "install.packages"]},
    {"languages": ["lua"], "line_comment": "--", "top_level_keywords": ["and", "break", "do", "else", "elseif", "end", "false", "for", "function", "if", "in", "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while"]},
    {"languages": ["scala"], "line_comment": "//", "top_level_keywords": ["abstract", "case", "class", "def", "do", "else", "enum", "extends", "final", "for", "given", "if", "implicit", "import", "lazy", "match", "new", "object", "override", "package", "private", "protected", "return", "sealed", "then", "throw", "trait", "try", "type", "val", "var", "while", "with", "yield"]},
    {"languages": ["ocaml"], "line_comment": None, "top_level_keywords": ["and", "as", "assert", "begin", "class", "constraint", "do", "done", "downto", "else", "end", "exception", "external", "for", "fun", "function", "functor", "if", "in", "include", "inherit", "initializer", "lazy", "let", "match", "method", "module", "mutable", "new", "nonrec", "object", "of", "open", "private", "rec", "sig", "struct", "then", "to", "try", "type", "val", "virtual", "when", "while", "with"]},
    {"languages": ["gdscript"], "line_comment": "#", "top_level_keywords": ["var", "const", "enum", "func", "class", "class_name", "extends"]},
    {"languages": ["css", "dockerfile", "haskell", "html", "julia", "makefile", "markdown", "txt", "perl", "powershell", "sql", "shellscript", "tex", "vb"],
     "line_comment": None, "top_level_keywords": []},
]
LANGUAGE = {name: entry for entry in LANGUAGES for name in entry["languages"]}
# any other language: Tabby's UNKNOWN_LANGUAGE, whose empty line comment makes "\n" a stop word
UNKNOWN_LANGUAGE = {"line_comment": "", "top_level_keywords": []}

# Tabby's DEFAULT stop words: a blank line, also followed by indentation (a tokenizer often
# emits "\n\n    " as one piece), and the special tokens of common FIM and chat formats.
DEFAULT_STOP_WORDS = (["\n\n"] + ["\n\n" + " " * n for n in range(2, 15, 2)] + ["\n\n" + "\t" * n for n in range(1, 8)]
                      + ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", " <EOT>", "<|fim_prefix|>", "<|fim_suffix|>",
                         "<|fim_middle|>", "<|file_separator|>", "<|system|>", "<|user|>", "<|end|>", "<|assistant|>"])

SNIPPET_BUDGET = 768  # characters of declarations and snippets put before the prefix (Tabby's)
PREFIX_STEP = 16  # lines a too-long prefix loses at a time, so its start (and the KV cache) stays put
EVAL_CHUNK = 64  # prompt tokens evaluated between two checks for a cancelled request
KV_SAVED = 8  # clients whose KV caches are kept while others use the model (each ~ its prompt's KV size)

# -----------------------------------------------------------------------------
# Prompt building: pure functions, no Flask, no model.


def stop_words(language):
    """Tabby's stop words for a language: DEFAULT, "\\n" + its line comment, "\\n" + each top-level keyword."""
    entry = LANGUAGE.get(language, UNKNOWN_LANGUAGE)
    comment = [] if entry["line_comment"] is None else ["\n" + entry["line_comment"]]
    return DEFAULT_STOP_WORDS + comment + ["\n" + kw for kw in entry["top_level_keywords"]]


def find_stop(text, words, tail=""):
    """Where generated text ends for the earliest stop word in tail + text that ends inside text,
    or None. tail is the end of the prompt: as in Tabby, a stop word may begin there.

    Tabby checks whether the prompt plus the generated text ends with a stop word after each
    token; searching the whole new text as well also catches a stop word inside one token."""
    both = tail + text
    hits = [both.find(w, max(0, len(tail) - len(w) + 1)) for w in words]
    hit = min((i for i in hits if i >= 0), default=None)
    return None if hit is None else max(0, hit - len(tail))


def scope_end(text, line_prefix, line_suffix):
    """Where tabby-agent's post-processing would cut text, so that generating on is waste, or
    None. line_prefix and line_suffix are the cursor line's text before and after the cursor.
    - Text after the cursor, other than closing brackets and quotes: one line only.
    - Code before the cursor: one line, unless the line opens a block (ends in ( [ { or :).
    - A line indented less than the cursor's line (or as little, after code) ends the text;
      it stays when it starts with a closing bracket, as the client keeps such a line."""
    newline = text.find("\n")
    if newline < 0:
        return None
    code = line_prefix.strip() != ""
    if line_suffix.strip(" \t)]}>\"'`") or (code and not (line_prefix + text[:newline]).rstrip().endswith(("(", "[", "{", ":"))):
        return newline
    limit = len(line_prefix) - len(line_prefix.lstrip()) + code  # indentation in characters, as the client counts
    while newline >= 0:
        end = text.find("\n", newline + 1)
        line = text[newline + 1:] if end < 0 else text[newline + 1:end]
        if line.strip() and len(line) - len(line.lstrip()) < limit:
            if line.lstrip()[0] not in ")]}":
                return newline
            return None if end < 0 else end  # the closing line, once whole
        newline = end
    return None


def pick_snippets(segments):
    """Declarations, then snippets from changed files, then from recently opened files, while
    their bodies fit Tabby's 768-character budget; a body that does not fit ends its list."""
    used, picked = 0, []
    for key in ("declarations", "relevant_snippets_from_changed_files", "relevant_snippets_from_recently_opened_files"):
        for snippet in segments.get(key) or []:
            size = len(snippet["body"].encode())  # bytes, as Rust's len()
            if used + size > SNIPPET_BUDGET:
                break
            used += size
            picked.append({"filepath": snippet["filepath"], "body": snippet["body"], "score": snippet.get("score", 1.0)})
    return picked


def build_prefix(language, prefix, snippets):
    """The prefix after a comment block of the snippets, each under a "Path:" line, as Tabby writes it."""
    comment = LANGUAGE.get(language, UNKNOWN_LANGUAGE)["line_comment"]
    if not snippets or not comment:  # no line comment, no way to hide code from the model
        return prefix
    lines = []
    for i, snippet in enumerate(snippets):
        lines += [f"Path: {snippet['filepath']}"] + snippet["body"].splitlines() + ([""] if i < len(snippets) - 1 else [])
    return "\n".join(f"{comment} {line}" if line else comment for line in lines) + "\n" + prefix


def split_template(template, specials):
    """'<PRE> {prefix} <SUF>{suffix} <MID>' -> ['<PRE>', ' ', '{prefix}', ' ', '<SUF>', '{suffix}', ' ', '<MID>']."""
    names = ["{prefix}", "{suffix}"] + sorted(specials, key=len, reverse=True)
    return [part for part in re.split("(" + "|".join(map(re.escape, names)) + ")", template) if part]


def fill_template(parts, specials, prefix, suffix):
    """The template with prefix and suffix put in, as pieces (a special token's id, or plain
    text to tokenize with special parsing off) and as one string for logs."""
    pieces, text = [], ""
    for part in parts:
        value = {"{prefix}": prefix, "{suffix}": suffix}.get(part, part)
        text += value
        if part in specials:
            pieces.append(specials[part])
        elif pieces and isinstance(pieces[-1], str):
            pieces[-1] += value
        else:
            pieces.append(value)
    return pieces, text


def most(limit, ok):
    """The largest n in 0..limit for which ok(n) holds, by bisection; ok(0) is taken as true."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def keep_lines(text, fits, keep_end, step=1):
    """The most whole lines from one end of text (its end if keep_end, else its start) for which
    fits(kept) holds, dropping lines step at a time: text that grows at its kept end then keeps
    the same first line for a while, and so does the KV cache. Only when not even the nearest
    line fits is that line cut, by characters."""
    if fits(text):
        return text
    end = (lambda seq, n: seq[len(seq) - n:]) if keep_end else (lambda seq, n: seq[:n])
    lines = text.splitlines(keepends=True)
    n = most(len(lines) - 1, lambda n: fits("".join(end(lines, n))))
    dropped = -(-(len(lines) - n) // step) * step  # rounded up to whole steps
    if dropped < len(lines):
        n = len(lines) - dropped
    if n > 0:
        return "".join(end(lines, n))
    line = end(lines, 1)[0]
    return end(line, most(len(line) - 1, lambda n: fits(end(line, n))))


def fit_prompt(prefix, suffix, count, budget):
    """Cut prefix (keeping its end) and suffix (keeping its start) at line boundaries until
    count(prefix, suffix) <= budget tokens. When both are long the suffix gets a quarter,
    llama-server's 3:1 split, then whatever room the prefix's whole lines leave."""
    if count(prefix, suffix) <= budget:
        return prefix, suffix
    room = max(budget // 4, budget - count(prefix, ""))
    short_suffix = keep_lines(suffix, lambda s: count("", s) <= room, keep_end=False)
    prefix = keep_lines(prefix, lambda p: count(p, short_suffix) <= budget, keep_end=True, step=PREFIX_STEP)
    return prefix, keep_lines(suffix, lambda s: count(prefix, s) <= budget, keep_end=False)


def clean(text):
    """text with lone surrogates (valid JSON, not valid UTF-8) replaced by U+FFFD."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")

# -----------------------------------------------------------------------------
# Request validation: each helper answers 400 with what was expected.

KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list", dict: "an object"}


def get(obj, key, kind, where="", required=False):
    """obj[key] if it is of kind (None when absent or null); strings come back clean()ed."""
    value = obj.get(key)
    if value is None:
        if required:
            abort(400, f"{where}{key} is required")
        return None
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        abort(400, f"{where}{key} must be {KINDS[kind]}")
    return clean(value) if kind is str else value


def parse_completion(body):
    """A /v1/completions body as plain values; unknown fields are ignored, as Tabby does."""
    debug = get(body, "debug_options", dict)
    raw_prompt = get(debug or {}, "raw_prompt", str, "debug_options.")
    segments = get(body, "segments", dict, required=raw_prompt is None) or {}
    req = {
        "language": get(body, "language", str) or "unknown",
        "user": get(body, "user", str),
        "temperature": get(body, "temperature", float),
        "seed": get(body, "seed", int),
        "debug": debug,
        "raw_prompt": raw_prompt,
        "segments": {},
    }
    if get(body, "mode", str) not in (None, "standard"):
        abort(400, "mode must be \"standard\" (next_edit_suggestion is not supported)")
    if req["temperature"] is not None and req["temperature"] < 0:
        abort(400, "temperature must be 0 or more")
    if req["seed"] is not None and req["seed"] < 0:
        abort(400, "seed must be 0 or more")
    for key in ("return_snippets", "return_prompt", "disable_retrieval_augmented_code_completion"):
        get(debug or {}, key, bool, "debug_options.")
    if raw_prompt is None:
        req["segments"]["prefix"] = get(segments, "prefix", str, "segments.", required=True)
    for key in ("suffix", "filepath", "git_url", "clipboard"):
        req["segments"][key] = get(segments, key, str, "segments.")
    for key in ("declarations", "relevant_snippets_from_changed_files", "relevant_snippets_from_recently_opened_files"):
        items = get(segments, key, list, "segments.")
        if items is not None:
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    abort(400, f"segments.{key}[{i}] must be an object")
                where = f"segments.{key}[{i}]."
                item = {"filepath": get(item, "filepath", str, where, True), "body": get(item, "body", str, where, True),
                        "score": get(item, "score", float, where)}
                items[i] = {k: v for k, v in item.items() if v is not None}
            req["segments"][key] = items
    return req

def parse_chat(body, stream=False):
    """A /v1/chat/completions body (OpenAI's shape) as plain values; stream is the default for
    "stream" (OpenAI's is false; Tabby's older clients stream without asking)."""
    messages = get(body, "messages", list, required=True)
    if not messages:
        abort(400, "messages must not be empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            abort(400, f"messages[{i}] must be an object")
        content = message.get("content")
        if isinstance(content, list):  # parts: only text can be read here
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
                abort(400, f"messages[{i}].content parts must all be {{\"type\": \"text\", \"text\": ...}}")
            message = dict(message, content="".join(part["text"] for part in content))
        messages[i] = {"role": get(message, "role", str, f"messages[{i}].", True), "content": get(message, "content", str, f"messages[{i}].") or ""}
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        abort(400, "stop must be a string or a list of non-empty strings")
    req = {"messages": messages, "stop": [clean(s) for s in stop or []], "user": get(body, "user", str),
           "temperature": get(body, "temperature", float), "seed": get(body, "seed", int), "max_tokens": get(body, "max_tokens", int)}
    req["stream"] = stream if get(body, "stream", bool) is None else body["stream"]
    if req["max_tokens"] is None:
        req["max_tokens"] = get(body, "max_completion_tokens", int)  # OpenAI's newer name
    get(body, "model", str)  # checked, not used: there is one chat model
    if req["temperature"] is not None and not 0 <= req["temperature"] <= 2:
        abort(400, "temperature must be between 0 and 2")
    if req["max_tokens"] is not None and req["max_tokens"] < 1:
        abort(400, "max_tokens must be at least 1")
    if req["seed"] is not None and req["seed"] < 0:
        abort(400, "seed must be 0 or more")
    return req


def sampling(req, temperature):
    """(temperature, seed) for a request: its own, else the server's and one from the clock, as
    32 bits (llama.cpp's seeds are)."""
    seed = req["seed"] if req["seed"] is not None else int(time.time() * 1000)
    return (req["temperature"] if req["temperature"] is not None else temperature), seed & 0xFFFFFFFF


# -----------------------------------------------------------------------------
# The model: loading, finding its FIM template, tokenizing, generating.


def download(repo_id, flag="--model"):
    """owner/repo[:file.gguf] from the Hugging Face hub into its cache, once, with a progress bar."""
    try:
        import huggingface_hub
    except ImportError:
        raise SystemExit(f"error: {flag} {repo_id} is a Hugging Face repo id, and downloading it needs "
                         "huggingface_hub: pip install huggingface_hub (or pass a local .gguf file)") from None
    repo, _, filename = repo_id.partition(":")
    try:
        if not filename:
            ggufs = [f for f in huggingface_hub.list_repo_files(repo) if f.endswith(".gguf")]
            tabby_layout = "ggml/model-00001-of-00001.gguf"  # where Tabby's own model repos keep it
            if len(ggufs) != 1 and tabby_layout not in ggufs:
                raise SystemExit(f"error: {flag} {repo_id}: {len(ggufs)} GGUF files there ({', '.join(ggufs[:8])}); "
                                 f"pick one as {repo}:FILE")
            filename = ggufs[0] if len(ggufs) == 1 else tabby_layout
        return huggingface_hub.hf_hub_download(repo, filename)
    except SystemExit:
        raise
    except Exception as e:  # no network, no such repo, disk full: all end start-up the same way
        raise SystemExit(f"error: {flag} {repo_id}: download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def load_model(config, path, flag="--model"):
    """A llama_cpp.Llama for a --model (or --chat-model) path or repo id, or SystemExit with one
    line that says what to fix."""
    if llama_cpp is None:
        raise SystemExit(f"error: {flag} needs llama-cpp-python: pip install llama-cpp-python (or use --backend URL of an engine)")
    if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+(?<!\.gguf)(:.+)?", path):  # not dir/x.gguf
        path = download(path, flag)
    if not os.path.isfile(path):
        raise SystemExit(f"error: {flag} {path}: no such file")
    gpu = config["device"] == "gpu"
    if gpu and not llama_cpp.llama_supports_gpu_offload():
        raise SystemExit("error: --device gpu: this llama-cpp-python was built without a GPU backend "
                         "(reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\", see README)")
    threads = config["threads"] or physical_cores()
    try:
        return llama_cpp.Llama(model_path=path, n_ctx=config["ctx"], n_threads=threads, n_threads_batch=threads,
                               n_batch=512, n_gpu_layers=-1 if gpu else 0, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {flag} {path}: cannot load it as a GGUF model ({e})") from None


def special_token(llm, text):
    """The id of the special token spelled text, or None when the model has no such token."""
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    return ids[0] if len(ids) == 1 and ids != llm.tokenize(text.encode(), add_bos=False, special=False) else None


def find_template(llm, override):
    """(template, {marker: token id}) for the model: --prompt-template, else the first known family
    whose markers it has, else one built from llama.cpp's FIM ids, else prefix only."""
    for template in [override] if override else FIM_TEMPLATES:
        specials = {m: special_token(llm, m) for m in re.findall(MARKER, template)}
        if None not in specials.values():
            return template, specials
        if override:
            missing = next(m for m, i in specials.items() if i is None)
            raise SystemExit(f"error: --prompt-template: {missing!r} is not a special token of this model "
                             "(a model without FIM tokens can only complete from the prefix: leave the template empty)")
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ids = [llama_cpp.llama_vocab_fim_pre(vocab), llama_cpp.llama_vocab_fim_suf(vocab), llama_cpp.llama_vocab_fim_mid(vocab)]
    if min(ids) < 0:
        return "{prefix}", {}
    pre, suf, mid = (llama_cpp.llama_vocab_get_text(vocab, i).decode(errors="replace") for i in ids)
    return f"{pre}{{prefix}}{suf}{{suffix}}{mid}", dict(zip((pre, suf, mid), ids))


def prompt_format(llm, override):
    """What start-up learns of the model's prompts, kept for every request: the template as parts,
    its special tokens, whether a BOS token leads, and a tokenizer for user text that never
    yields the template's tokens, BOS or EOS."""
    template, specials = find_template(llm, override)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
    protected = {llm.token_bos(), llm.token_eos(), *specials.values()}
    # While the user types on a line, only that line changes: the other pieces of the prompt
    # (the text above, the suffix) come from here instead of the tokenizer.
    tokenize = functools.lru_cache(maxsize=16)(lambda text: tuple(tokenize_text(llm, text, protected)))
    return template_format(template, specials, bos=[llm.token_bos()] if add_bos else [], tokenize=tokenize)


def template_format(template, specials, **more):
    """The record of a FIM template that arrange() and encode() read, plus more."""
    return {"template": template, "fim": "{suffix}" in template, "line_last": not template.endswith("{prefix}"),
            "parts": split_template(template, specials), "specials": specials, **more}


def arrange(fmt, prefix, suffix):
    """(pieces, text) of the prompt for prefix and suffix: fill_template()'s, except that code
    typed on the cursor line goes after the template, as the start of the middle (llama.cpp's
    infill does so): each keystroke then only adds to the end, and the KV cache keeps the rest.
    An indentation-only line stays: Tabby's prompt."""
    line = prefix[prefix.rfind("\n") + 1:] if fmt["line_last"] else ""
    line = line if line.strip() else ""
    pieces, text = fill_template(fmt["parts"], fmt["specials"], prefix[:len(prefix) - len(line)], suffix)
    return pieces + [line], text + line


def encode(fmt, prefix, suffix):
    """(tokens, text) of the prompt: the template's special tokens as ids, the rest tokenized as plain text."""
    pieces, text = arrange(fmt, prefix, suffix)
    return fmt["bos"] + [t for p in pieces for t in ([p] if isinstance(p, int) else fmt["tokenize"](p))], text


def tokenize_text(llm, text, protected):
    """User text as tokens with special parsing off. llama.cpp still matches user-defined tokens
    (some GGUFs mark FIM tokens so), so any protected token found is spelled out as text."""
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    if not protected.intersection(ids):
        return ids
    out = []
    for i in ids:
        if i in protected:  # split its spelling in two, so neither half can match the token
            spelling = llm.detokenize([i], special=True)
            out += llm.tokenize(spelling[:1], add_bos=False, special=False) + llm.tokenize(spelling[1:], add_bos=False, special=False)
        else:
            out.append(i)
    return out


def piece(vocab, token):
    """The bytes of one token (llama-cpp-python's detokenize garbles pieces over 32 bytes)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, 64, 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, -n, 0, False)
    return buf.raw[:n]


def common_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def save_kv(llm):
    """(tokens, bytes) of what the KV cache holds: llama.cpp's own copy of its sequence."""
    size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    data = (ctypes.c_uint8 * size)()
    llama_cpp.llama_state_seq_get_data(llm.ctx, data, size, 0)
    return llm.input_ids[:llm.n_tokens].tolist(), data


def load_kv(llm, saved):
    """Put a save_kv() copy back into the KV cache (a memory copy, instead of evaluating it again)."""
    tokens, data = saved
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), 0, -1, -1)
    loaded = llama_cpp.llama_state_seq_set_data(llm.ctx, data, len(data), 0) > 0
    llm.input_ids[:len(tokens)] = tokens
    llm.n_tokens = len(tokens) if loaded else 0


def keep_kv(llm, tokens):
    """Keep what the KV cache holds of the start of tokens (all but the last, which generating
    evaluates) and drop the rest; -> how many tokens it keeps."""
    reused = common_prefix(llm.input_ids[:llm.n_tokens].tolist(), tokens[:-1])
    llm.n_tokens = reused  # eval() drops the KV cache from here on
    return reused


def model_pieces(llm, tokens, temperature, seed):
    """The bytes of each token the model generates after tokens, until an end-of-generation or
    other special token. What keep_kv() did not keep is evaluated a chunk at a time, with an
    empty piece after each chunk: there the consumer may stop, or let other work run first."""
    if not tokens:  # an empty prompt, for a model without a BOS token: nothing to go on
        return
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    for i in range(llm.n_tokens, len(tokens) - 1, EVAL_CHUNK):
        llm.eval(tokens[i:min(i + EVAL_CHUNK, len(tokens) - 1)])
        yield b""
    llm.set_seed(seed)
    for token in llm.generate(tokens, temp=temperature, repeat_penalty=1.0):  # evaluates the last prompt token
        if llama_cpp.llama_vocab_is_eog(vocab, token) or llama_cpp.llama_vocab_is_control(vocab, token):
            return
        yield piece(vocab, token)


def generate(pieces, max_tokens, end_of=lambda text: None, should_stop=lambda: False, budget=0):
    """The one generation loop, over the pieces a model or an engine generates (bytes or str,
    about a token each; empty while it is busy). It takes them until: they end ("eos");
    end_of(text) gives where the text ends ("stop": stop words, scope); max_tokens ("length");
    budget seconds spent, then at the next line end ("time"); should_stop() (client gone, newer
    request: "cancelled", and no text). Then it closes pieces, which for an engine drops the
    connection. Yields the text so far after each piece (for streaming); returns
    (text, pieces taken, reason): run it with finish() when only that matters."""
    raw, text, n, start, late = b"", "", 0, time.monotonic(), None
    try:
        for chunk in pieces:
            if should_stop():
                return "", n, "cancelled"
            if not chunk:
                continue
            n += 1
            raw += chunk if isinstance(chunk, bytes) else chunk.encode()
            before, text = len(text), raw.decode("utf-8", "ignore")  # a character split across tokens shows up once whole
            end = end_of(text)
            if end is not None:
                return text[:end], n, "stop"
            if budget and late is None and time.monotonic() - start > budget:
                late = before  # llama-server's t_max_predict_ms: the line being written may end
            if late is not None and "\n" in text[late:]:
                return text[:text.index("\n", late)], n, "time"
            if n >= max_tokens:
                return text, n, "length"
            yield text
        return ("", n, "cancelled") if should_stop() else (text, n, "eos")  # the pieces may have ended for it
    finally:
        pieces.close()


def finish(steps):
    """Run a generate() to its end; -> what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def physical_cores():
    """Cores this machine has, not counting hyper-threads: llama.cpp runs best with one thread each."""
    try:
        with open("/proc/cpuinfo") as f:
            cpus = f.read().split("\n\n")
        cores = {tuple(line.split(":")[1].strip() for line in cpu.splitlines() if line.startswith(("physical id", "core id")))
                 for cpu in cpus if "core id" in cpu}
        return max(1, min(len(cores), len(os.sched_getaffinity(0))))
    except (OSError, AttributeError):
        return os.cpu_count() or 1


def client_gone(environ):
    """Whether the HTTP client hung up, as tabby-agent does on every keystroke. Werkzeug's server
    (python app.py, flask run) exposes the socket; elsewhere this cannot tell, and says no."""
    sock = environ.get("werkzeug.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""  # readable and empty: closed
    except (OSError, ValueError):
        return True


def system_info(config, engine=None):
    """The static part of /v1/health: what runs this server."""
    cpu_info = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu_info = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu_info)
    model = os.path.basename(config["model"]) if os.path.exists(config["model"]) else config["model"]
    device = "cpu"
    if engine:
        model, device = engine["model"] or "Remote", "remote"  # Tabby's name for an HTTP model without one
    elif config["device"] == "gpu":
        backends = llama_cpp.llama_print_system_info().decode()
        device = next((name.lower() for name in ("CUDA", "Metal", "Vulkan", "ROCm", "SYCL") if name in backends), "gpu")
    return {"model": model, "device": device, "arch": platform.machine(), "cpu_info": cpu_info,
            "cpu_count": os.cpu_count(), "cuda_devices": [],
            "version": {"build_date": "", "build_timestamp": "", "git_sha": "", "git_describe": TABBY_VERSION}}

# -----------------------------------------------------------------------------
# Remote engines (--backend): the prompt is built here, the engine generates, streaming back
# pieces of text that feed the same generate() loop as a local model's tokens.

# kind: (its completion endpoint, a cheap GET that shows it answers), under the engine's base URL
ENGINES = {
    "llama.cpp": ("/completion", "/health"),  # llama-server
    "openai": ("/v1/completions", "/v1/models"),  # vLLM, llama-cpp-python's server, LM Studio, ...
    "ollama": ("/api/generate", "/api/version"),
}
CHAT_PATH = "/v1/chat/completions"  # every kind of engine serves OpenAI's chat API (Ollama and llama-server too)
BYTES_PER_TOKEN = 3  # no tokenizer here: prompts are fitted to --ctx counting a token per 3 bytes (code has more)
RETRIES = 3  # tries to reach an engine that refuses connections or answers 503 (loading, busy), 0.1 s then 0.2 s apart
# Text shaped like a special token. An engine tokenizes a text prompt with special tokens parsed,
# so user code must not carry such text there as it is: a zero-width space goes after its first
# character. (A local model gets the text as text; see tokenize_text.)
SPECIAL_LOOKING = r"<\|[^|<>\s]+\|>|<｜[^｜<>\s]+｜>|</?s>|<(?:fim[_-]\w+|file_sep|repo_name|PRE|SUF|MID|EOT)>|\[(?:PREFIX|SUFFIX|MIDDLE)\]"


def engine_of(config):
    """The engine --backend names: its kind (--backend-kind, else told by the URL's path), the
    URL's parts and base path, and what to send it. SystemExit when the URL says too little."""
    url = urllib.parse.urlsplit(config["backend"])
    try:
        if url.scheme not in ("http", "https") or not url.hostname or url.port == 0:
            raise ValueError
    except ValueError:  # url.port raises it too, for a port that is not a number
        raise SystemExit(f"error: --backend {config['backend']!r}: not an http:// or https:// URL") from None
    path = url.path.rstrip("/")
    kind = config["backend_kind"] or ("openai" if path.endswith("/v1") else
                                      next((k for k, (endpoint, _) in ENGINES.items() if path.endswith(endpoint)), ""))
    if kind not in ENGINES:
        raise SystemExit(f"error: --backend-kind must be one of {', '.join(ENGINES)}, not {kind!r}" if kind else
                         f"error: --backend {config['backend']}: which engine is it? End the URL with /completion (llama-server), "
                         "/v1 (OpenAI-style: vLLM, ...) or /api/generate (Ollama), or pass --backend-kind")
    for tail in (ENGINES[kind][0], "/v1"):
        if path.endswith(tail):
            path = path[:-len(tail)]
            break
    return {"kind": kind, "url": url, "base": f"{url.scheme}://{url.netloc}{path}", "path": path, "model": config["backend_model"],
            "headers": {"Content-Type": "application/json", **({"Authorization": f"Bearer {config['backend_token']}"} if config["backend_token"] else {})},
            "timeout": config["backend_timeout"]}


def engine_connection(engine, timeout):
    connection = http.client.HTTPSConnection if engine["url"].scheme == "https" else http.client.HTTPConnection
    return connection(engine["url"].hostname, engine["url"].port, timeout=timeout)


def engine_get(engine, path, timeout):
    """The JSON an engine answers a GET of path with; OSError, HTTPException or ValueError if it does not."""
    conn = engine_connection(engine, timeout)
    try:
        conn.request("GET", engine["path"] + path, headers=engine["headers"])
        response = conn.getresponse()
        body = response.read(1 << 20)
        if response.status != 200:
            raise ValueError(f"it answered {response.status}")
        return json.loads(body)
    finally:
        conn.close()


def engine_format(engine, override):
    """prompt_format() for an engine's model: --prompt-template, else the template known for its
    name (--backend-model, else the first model the engine lists). The markers stay text: the
    engine makes them tokens."""
    if engine["kind"] == "ollama" and not engine["model"]:
        raise SystemExit("error: --backend-model is needed for Ollama (the model's name, e.g. qwen2.5-coder:1.5b-base)")
    if not engine["model"] and not override:
        try:
            engine["model"] = engine_get(engine, "/v1/models", engine["timeout"])["data"][0]["id"]
        except (OSError, http.client.HTTPException, ValueError, LookupError, TypeError) as e:
            raise SystemExit(f"error: --backend {engine['base']}: cannot ask it which model it serves ({e or type(e).__name__}); "
                             "pass --backend-model NAME or --prompt-template") from None
    name = engine["model"].lower()
    template = override or next((t for t, names in FIM_TEMPLATES.items() if any(n in name for n in names)), None)
    if template is None:
        raise SystemExit(f"error: no FIM template is known for the model {engine['model']!r}: pass --prompt-template "
                         "(e.g. '<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>', or '{prefix}' for prefix-only)")
    markers = re.findall(MARKER, template)
    special = re.compile("|".join([SPECIAL_LOOKING] + [re.escape(m) for m in markers]))
    return template_format(template, {m: m for m in markers}, defang=lambda text: special.sub(lambda m: m[0][0] + "\u200b" + m[0][1:], text))


def engine_body(engine, prompt, max_tokens, temperature, seed):
    """The engine's streaming completion request for a prompt, already templated. No stop words:
    an engine holds back text that may begin one ("\n" begins them all) until the next token,
    which would make every answer that ends at a line end a token late. We stop it ourselves."""
    if engine["kind"] == "llama.cpp":
        return {"prompt": prompt, "n_predict": max_tokens, "temperature": temperature, "seed": seed,
                "stream": True, "cache_prompt": True, "repeat_penalty": 1.0}
    if engine["kind"] == "openai":
        return {**({"model": engine["model"]} if engine["model"] else {}), "prompt": prompt, "max_tokens": max_tokens,
                "temperature": temperature, "seed": seed, "stream": True}
    return {"model": engine["model"], "prompt": prompt, "raw": True, "stream": True,
            "options": {"num_predict": max_tokens, "temperature": temperature, "seed": seed, "repeat_penalty": 1.0}}


def engine_error(response):
    """What an engine's non-200 answer says: its JSON error message, else the start of its body."""
    text = response.read(4096).decode("utf-8", "replace")
    try:
        error = json.loads(text)
        error = error.get("error") or error.get("detail") or error
        error = error.get("message", error) if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        error = text
    return f"{response.status}: {str(error).strip()[:200]}"


def hang_up(sock):
    try:  # the engine sees the end now, whoever else holds the socket (the plain socket's shutdown:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # an SSL socket's own would unwrap it under its reader)
    except OSError:
        pass


def watch(sock, should_stop):
    """Check should_stop() every 10 ms, also while we wait for the engine (a long prompt, a queue),
    and hang up sock the moment it says so; -> the Event that ends the watch."""
    done = threading.Event()

    def run():
        while not done.wait(0.01):
            if should_stop():
                return hang_up(sock)
    threading.Thread(target=run, daemon=True).start()
    return done


def engine_open(engine, path, body, should_stop):
    """(socket, response, watch) of the engine's 200 answer to a POST of body to path, or Nones
    when should_stop() first. Refused connections and 503s (down, loading, busy) are tried
    RETRIES times, with backoff; any other failure gets a 502 at once, no answer a 504."""
    for attempt in range(RETRIES):
        if attempt:
            time.sleep(0.1 * 2 ** (attempt - 1))
        conn, watching = engine_connection(engine, engine["timeout"]), threading.Event()
        try:
            conn.request("POST", engine["path"] + path, json.dumps(body), engine["headers"])
            sock = conn.sock
            watching = watch(sock, should_stop)
            response = conn.getresponse()
            if response.status == 200:
                return sock, response, watching
            status, error = response.status, f"answered {engine_error(response)}"
        except TimeoutError:
            status, error = 504, f"did not answer within {engine['timeout']:g} s"
        except ConnectionError as e:
            status, error = 503, f"cannot reach it: {e.strerror or type(e).__name__}"
        except (OSError, http.client.HTTPException) as e:
            status, error = 502, f"{e or type(e).__name__}"
        conn.close()
        watching.set()
        if should_stop():
            return None, None, None
        if status != 503:
            break
    abort(504 if status == 504 else 502, f"engine at {engine['base']}: {error}")


def engine_event(kind, line):
    """(text, finished) of one line of an engine's stream: SSE "data: {json}" lines (llama.cpp,
    openai, chat) or JSON lines (Ollama); (None, False) for the lines between events; 502 for others."""
    line = line.decode("utf-8", "replace").strip()
    if not line or (kind != "ollama" and line.startswith((":", "event:", "id:", "retry:"))):
        return None, False
    if kind != "ollama" and line == "data: [DONE]":
        return None, True
    try:
        event = json.loads(line[5:] if kind != "ollama" and line.startswith("data:") else line)
        if "error" in event:
            abort(502, f"engine error: {str(event['error'])[:200]}")
        if kind == "llama.cpp":
            text, finished = event["content"], event.get("stop")
        elif kind in ("openai", "chat"):
            if not event["choices"]:  # a usage-only chunk
                return None, False
            choice = event["choices"][0]
            text = choice["text"] if kind == "openai" else choice["delta"].get("content") or ""
            finished = choice.get("finish_reason")
        else:
            text, finished = event["response"], event.get("done")
        if not isinstance(text, str):
            raise TypeError
        return text, bool(finished)
    except (ValueError, LookupError, TypeError, AttributeError):
        abort(502, f"engine sent something that is not a {kind} stream: {line[:100]!r}")


def engine_pieces(engine, path, kind, body, should_stop):
    """The pieces of text an engine streams for a request (kind: how to read them), as an iterator.
    The request is made here, so that an engine that fails at once gets its 502 or 504 before
    anything is answered. Closing the iterator, or should_stop() (see watch), drops the
    connection at once: the engine stops generating and frees its slot for the next request."""
    sock, response, watching = engine_open(engine, path, body, should_stop)
    if response is None:
        return (piece for piece in ())

    def pieces():
        try:
            while True:
                line = response.readline(1 << 20)
                if not line:
                    if should_stop():
                        return
                    abort(502, f"engine at {engine['base']} ended its stream before it finished")
                text, finished = engine_event(kind, line)
                if text:
                    yield text
                if finished:
                    return
        except TimeoutError:
            abort(504, f"engine at {engine['base']} sent nothing for {engine['timeout']:g} s")
        except (OSError, ValueError, http.client.HTTPException) as e:
            if should_stop():
                return
            abort(502, f"engine at {engine['base']}: the stream broke off ({e or type(e).__name__})")
        finally:
            watching.set()
            hang_up(sock)
            response.close()
            sock.close()
    return pieces()

# -----------------------------------------------------------------------------
# Chat (--chat-model): OpenAI's chat API, as Tabby serves it to its clients' edit and chat commands.


def chat_formatter(llm, override, flag):
    """llama-cpp-python's Jinja2 formatter for the chat model's template: --chat-template, else the
    one in its GGUF metadata; SystemExit without either."""
    template = override or llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise SystemExit(f"error: {flag}: the model has no chat template in its metadata: pass --chat-template "
                         "(a Jinja2 template), or another model")
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    text = lambda token: llama_cpp.llama_vocab_get_text(vocab, token).decode(errors="replace") if token >= 0 else ""  # noqa: E731
    try:
        return llama_cpp.llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=text(llm.token_eos()),
                                                               bos_token=text(llm.token_bos()), stop_token_ids=[llm.token_eos()])
    except Exception as e:  # jinja2's TemplateSyntaxError and kin
        raise SystemExit(f"error: --chat-template: not a Jinja2 template: {e}") from None


def chat_prompt(llm, formatter, messages):
    """(prompt, tokens) of messages through the chat template. The template's own text is
    tokenized with special tokens parsed and the messages' text as plain text, so that no message
    can end its turn or start another. Where the messages' text is in the prompt shows in a second
    rendering with a placeholder for each (put back as written, or stripped as templates often do)."""
    prompt = formatter(messages=messages).prompt
    placeholders = [dict(m, content=f"\ue000{i}\ue001") for i, m in enumerate(messages)]  # private-use characters
    parts = re.split("\ue000(\\d+)\ue001", formatter(messages=placeholders).prompt)  # template text, message number, ...
    special = lambda text: llm.tokenize(text.encode(), add_bos=False, special=True)  # noqa: E731
    template = "".join(parts[::2])
    protected = set(special(template)) - set(llm.tokenize(template.encode(), add_bos=False, special=False))
    for texts in ([m["content"] for m in messages], [m["content"].strip() for m in messages]):
        if "".join(texts[int(p)] if i % 2 else p for i, p in enumerate(parts)) == prompt:
            return prompt, [t for i, p in enumerate(parts) for t in (tokenize_text(llm, texts[int(p)], protected) if i % 2 else special(p))]
    if any(special(m["content"]) != llm.tokenize(m["content"].encode(), add_bos=False, special=False) for m in messages):
        abort(422, "the chat template changes the messages' text, so special tokens spelled in it could not be kept as text")
    return prompt, special(prompt)


def held_back(text, stops):
    """How much of text can be streamed: all but an end that may begin a stop word."""
    for n in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1):
        if any(stop.startswith(text[-n:]) for stop in stops):
            return len(text) - n
    return len(text)


# -----------------------------------------------------------------------------
# The app.


def create_app(config=None):
    """The Flask app serving one model. flask run calls it with nothing: config from the env."""
    if config is None:
        try:
            config = load_config(environ=os.environ)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    if config["device"] not in ("cpu", "gpu"):
        raise SystemExit(f"error: --device must be cpu or gpu, not {config['device']!r}")
    if not config["backend_timeout"] > 0:
        raise SystemExit("error: --backend-timeout must be more than 0 seconds")
    if not 0 < config["max_tokens"] < config["ctx"]:
        raise SystemExit(f"error: --max-tokens must be at least 1 and less than --ctx ({config['ctx']})")
    events_dir = os.path.join(os.path.expanduser(config["root"]), "events")
    try:
        os.makedirs(events_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --root: cannot create {events_dir}: {e.strerror}") from None

    if config["backend"] and config["model"]:
        raise SystemExit("error: --model and --backend both given: pass one (--backend generates with the engine's model)")
    local_only = [flag for flag, given in (("--device", config["device"] != "cpu"), ("--threads", config["threads"]),
                                           ("--chat-template", config["chat_template"])) if given]
    if config["backend"] and local_only:
        raise SystemExit(f"error: {', '.join(local_only)}: for a local model; with --backend the engine decides")
    if not config["model"] and not config["backend"]:
        raise SystemExit(f"error: no model: pass --model PATH.gguf or set {ENV_PREFIX}MODEL (or --backend URL of an engine)")
    engine = engine_of(config) if config["backend"] else None
    llm = None if engine else load_model(config, config["model"])
    fmt = engine_format(engine, config["prompt_template"]) if engine else prompt_format(llm, config["prompt_template"])
    health = system_info(config, engine)
    chat_llm = chat_format = None
    chat_name = config["chat_model"]  # for an engine, the name sent ("" sends none)
    if chat_name and engine:
        chat_name = engine["model"] if chat_name == "same" else chat_name
    elif chat_name:  # "same": the model once more, a context of its own (the weights are memory-mapped: shared on a CPU)
        chat_llm = load_model(config, llm.model_path if chat_name == "same" else chat_name, "--chat-model")
        chat_format = chat_formatter(chat_llm, config["chat_template"], "--chat-model " + chat_name)
        chat_name = os.path.basename(chat_llm.model_path) if os.path.exists(chat_name) or chat_name == "same" else chat_name
    if config["chat_model"]:
        health.update(chat_model=chat_name or "Remote", chat_device=health["device"])
    chat_lock = threading.Lock()  # one chat at a time on the chat model; completions go between its steps
    # The model runs on a thread of its own: a Llama context is not thread-safe, flask run serves
    # each request on a new thread, and llama.cpp's OpenMP workers belong to the calling thread
    # (a new caller pays ~4 ms to start them). Requests queue for it first come first served, so
    # that one editor's stream of requests cannot starve another's. (An engine queues its own.)
    model_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    if llm:
        warm_up = encode(fmt, "def main():\n    ", "\n")[0]
        model_thread.submit(lambda: finish(generate(model_pieces(llm, warm_up, 0, 0), 2))).result()  # pages in the weights, starts the workers
    log_lock = threading.Lock()
    # Per client (address, user, file): the number of its newest request, so that a newer one
    # pre-empts it, and its last answer, for typed-through answers. Small, under its own lock.
    numbers, newest, last_answer, clients_lock = itertools.count(), {}, collections.OrderedDict(), threading.Lock()
    # Whose requests the KV cache holds, and the caches of the last few other clients, so that
    # editors taking turns get theirs back (a copy) instead of evaluating their prompts again.
    # Used on the model thread only.
    kv_owner, kv_saved = None, collections.OrderedDict()

    def use_kv_of(client, tokens):
        nonlocal kv_owner
        if client == kv_owner:
            return
        if kv_owner is not None and llm.n_tokens:
            kv_saved[kv_owner] = save_kv(llm)
            if len(kv_saved) > KV_SAVED:
                kv_saved.popitem(last=False)
        mine = kv_saved.pop(client, None)
        if mine and common_prefix(mine[0], tokens) > common_prefix(llm.input_ids[:llm.n_tokens].tolist(), tokens):
            load_kv(llm, mine)
        kv_owner = client

    template = f"FIM template {fmt['template']!r}" if fmt["fim"] else "prefix-only prompts"
    if engine:
        print(f"engine {engine['kind']} at {engine['base']}, model {health['model']}: {template} "
              f"({'--prompt-template' if config['prompt_template'] else 'known for this model name'}); "
              f"prompts up to ctx {config['ctx']} tokens, counted as {BYTES_PER_TOKEN} bytes each", file=sys.stderr)
    else:
        print(f"model {health['model']}: {template if fmt['fim'] else 'no FIM tokens, prefix-only prompts'}; "
              f"ctx {config['ctx']}, {llm.context_params.n_threads} threads, device {health['device']}", file=sys.stderr)
    if config["chat_model"]:
        print(f"chat model {health['chat_model']}" + (" (the engine's)" if engine else
              f": {'--chat-template' if config['chat_template'] else 'the chat template in its metadata'}"), file=sys.stderr)
    if not config["token"] and config["host"] not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {config['host']} without a token: anyone who can reach it can use it "
              f"(set --token or {ENV_PREFIX}TOKEN)", file=sys.stderr)

    def log_event(user, event):
        """Append one line to today's (UTC) events file, in Tabby's layout, with one write()."""
        now = time.time()
        line = json.dumps({"user": user, "ts": int(now * 1000), "event": event}, ensure_ascii=False) + "\n"
        path = os.path.join(events_dir, time.strftime("%Y-%m-%d", time.gmtime(now)) + ".json")
        with log_lock:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def on_model_thread(should_stop, work, *args):
        """work(*args) run on the model thread when its turn comes, or None when should_stop()
        while it waits (once started, work checks should_stop itself)."""
        future = model_thread.submit(work, *args)
        while True:
            try:
                return future.result(timeout=0.01)
            except concurrent.futures.TimeoutError:
                if should_stop() and future.cancel():
                    return None

    def typed_through(client, language, prefix, suffix):
        """(the rest of this client's last completion, its prompt) when the client typed the
        start of that completion since, or None."""
        with clients_lock:
            last = last_answer.get(client)
        if last is None or (language, suffix) != (last["language"], last["suffix"]) or not prefix.startswith(last["prefix"]):
            return None
        typed, text = prefix[len(last["prefix"]):], last["text"]
        return (text[len(typed):], last["prompt"]) if typed and text.startswith(typed) and len(text) > len(typed) else None

    def json_body():
        try:
            body = json.loads(request.get_data())
        except UnicodeDecodeError:
            abort(400, "body is not valid UTF-8")
        except ValueError as e:
            abort(400, f"body is not valid JSON: {e}")
        if not isinstance(body, dict):
            abort(400, "body must be a JSON object")
        return body

    app = Flask(__name__)
    app.logger.setLevel(logging.INFO)  # one line per completion
    app.config["MAX_CONTENT_LENGTH"] = config["max_body"]
    app.json.ensure_ascii = False

    @app.before_request
    def check_token():
        if config["token"] and request.path.startswith(("/v1/", "/v1beta/")):
            given = request.headers.get("Authorization", "").partition(" ")[2]  # any scheme, as Tabby
            if not hmac.compare_digest(given.encode(), config["token"].encode()):
                abort(401, "missing or wrong token: send Authorization: Bearer <token>")

    @app.errorhandler(HTTPException)
    def http_error(e):
        return jsonify(error=e.description), e.code

    @app.errorhandler(Exception)
    def server_error(e):
        app.logger.exception("unexpected error on %s", request.path)
        return jsonify(error=f"internal error: {type(e).__name__}"), 500

    @app.route("/v1/health", methods=["GET", "POST"])
    def health_route():
        if engine is None:
            return jsonify(health)
        try:  # whether the engine answers now, in 2 s at most
            engine_get(engine, ENGINES[engine["kind"]][1], min(2, engine["timeout"]))
            error = None
        except (OSError, http.client.HTTPException, ValueError) as e:
            error = f"{e or type(e).__name__}"
        backend = {"kind": engine["kind"], "url": engine["base"], "answers": error is None, **({"error": error} if error else {})}
        return jsonify({**health, "backend": backend})

    @app.get("/v1beta/server_setting")
    def server_setting():
        return jsonify(disable_client_side_telemetry=not config["client_telemetry"])

    @app.post("/v1/events")
    def events():
        body = json_body()
        kind = get(body, "type", str, required=True)
        fields = {"completion_id": get(body, "completion_id", str, required=True),
                  "choice_index": get(body, "choice_index", int, required=True),
                  "view_id": get(body, "view_id", str), "elapsed": get(body, "elapsed", int),
                  "kind": clean(request.args["select_kind"]) if "select_kind" in request.args else None}
        log_event(get(body, "user", str), {kind: {k: v for k, v in fields.items() if v is not None}})
        return "", 200

    @app.post("/v1/completions")
    def completions():
        t0 = time.perf_counter()
        req = parse_completion(json_body())
        seg, debug = req["segments"], req["debug"] or {}
        client = (request.remote_addr, req["user"], seg.get("filepath"))
        with clients_lock:
            number = newest[client] = next(numbers)
        environ = request.environ

        def should_stop():
            with clients_lock:
                superseded = newest.get(client) != number
            return superseded or client_gone(environ)

        try:
            text, prompt, snippets, log = answer(req, client, should_stop)
        finally:
            with clients_lock:
                if newest.get(client) == number:
                    del newest[client]
        completion_id = f"cmpl-{uuid.uuid4()}"
        choices = [{"index": 0, "text": text}]
        if log["reason"] != "cancelled":
            log_event(req["user"], {"completion": {
                "completion_id": completion_id, "language": req["language"], "prompt": prompt,
                "segments": {k: v for k, v in seg.items() if v is not None}, "choices": choices,
                "user_agent": request.headers.get("User-Agent")}})
        app.logger.info("%s: %d prompt tokens (%d reused), %d generated, %s; %.1f ms in the model, %.1f ms in all",
                        completion_id, log["prompt"], log["reused"], log["generated"], log["reason"], log["ms"],
                        (time.perf_counter() - t0) * 1000)
        response = {"id": completion_id, "choices": choices}
        if req["debug"] is not None:
            response["debug_data"] = {**({"snippets": snippets} if debug.get("return_snippets") else {}),
                                      **({"prompt": prompt} if debug.get("return_prompt") else {})}
        return jsonify(response)

    @app.post("/v1/chat/completions")
    @app.post("/v1beta/chat/completions")  # the path of Tabby 0.7-0.10, which clients fall back to
    def chat_completions():
        if not config["chat_model"]:
            abort(501, "no chat model: start the server with --chat-model (a GGUF file, a Hugging Face repo id, or 'same')")
        req = parse_chat(json_body(), stream=request.path.startswith("/v1beta/"))
        environ, chat_id, created = request.environ, f"chatcmpl-{uuid.uuid4()}", int(time.time())
        should_stop = lambda: client_gone(environ)  # noqa: E731
        steps, prompt_size = chat_steps(req, should_stop)

        def chunk(delta, finish_reason=None):
            return "data: " + json.dumps({"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": health["chat_model"],
                                          "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]},
                                         ensure_ascii=False) + "\n\n"

        def done(text, n, reason):
            if reason != "cancelled":
                log_event(req["user"], {"chat_completion": {"completion_id": chat_id, "input": req["messages"],
                                                             "output": {"role": "assistant", "content": text}}})
            app.logger.info("%s: %d prompt tokens, %d generated, %s", chat_id, prompt_size, n, reason)
            return "length" if reason == "length" else "stop"

        if not req["stream"]:
            text, n, reason = finish(steps)
            return jsonify(id=chat_id, object="chat.completion", created=created, model=health["chat_model"],
                           choices=[{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                     "finish_reason": done(text, n, reason)}],
                           usage={"prompt_tokens": prompt_size, "completion_tokens": n, "total_tokens": prompt_size + n})

        def deltas():
            """(new text, None) after each step, holding back an end that may begin a stop word;
            then (the rest, finish reason)."""
            sent = 0
            while True:
                try:
                    text = next(steps)
                except StopIteration as end:
                    text, n, reason = end.value
                    yield text[sent:], done(text, n, reason)
                    return
                end = held_back(text, req["stop"])
                if end > sent:
                    yield text[sent:end], None
                    sent = end

        def stream():  # Server-Sent Events, as Tabby sends them: every event is JSON, no "data: [DONE]"
            try:
                yield chunk({"role": "assistant", "content": ""})
                for delta, finish_reason in deltas():
                    if delta:
                        yield chunk({"content": delta})
                    if finish_reason:
                        yield chunk({}, finish_reason)
            except Exception as e:  # the headers are gone: the error goes in the stream
                if not isinstance(e, HTTPException):
                    app.logger.exception("unexpected error in chat %s", chat_id)
                message = e.description if isinstance(e, HTTPException) else f"internal error: {type(e).__name__}"
                yield "data: " + json.dumps({"error": {"message": message, "code": getattr(e, "code", 500)}}) + "\n\n"
            finally:
                steps.close()  # the client left: stop generating
        return app.response_class(stream(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})

    def chat_steps(req, should_stop):
        """(generate() steps of the answer, prompt size in tokens) for a parsed chat request."""
        temperature, seed = sampling(req, config["temperature"])
        end_of = lambda text: find_stop(text, req["stop"])  # noqa: E731
        if engine:
            body = {**({"model": chat_name} if chat_name else {}), "messages": req["messages"], "temperature": temperature,
                    "seed": seed, "stream": True, **({"max_tokens": req["max_tokens"]} if req["max_tokens"] else {})}
            pieces = engine_pieces(engine, CHAT_PATH, "chat", body, should_stop)
            return generate(pieces, req["max_tokens"] or math.inf, end_of, should_stop), 0
        try:
            _, tokens = chat_prompt(chat_llm, chat_format, req["messages"])
        except HTTPException:
            raise
        except Exception as e:  # the template's raise_exception (roles must alternate, ...) and jinja2's errors
            abort(422, f"the chat template cannot render these messages: {e}")
        room = config["ctx"] - len(tokens)
        if room < 1:
            abort(400, f"the messages take {len(tokens)} tokens; the chat model's context holds {config['ctx']} (--ctx)")

        def pieces():  # run on the model thread a step at a time
            keep_kv(chat_llm, tokens)
            yield from model_pieces(chat_llm, tokens, temperature, seed)
        return generate(stepwise(pieces(), should_stop), min(req["max_tokens"] or room, room), end_of, should_stop), len(tokens)

    def stepwise(pieces, should_stop):
        """The chat model's pieces, one chat at a time, each computed on the model thread as a task
        of its own: completions that come meanwhile go first, waiting one token (or one chunk of
        the chat's prompt) at most."""
        while not chat_lock.acquire(timeout=0.05):
            if should_stop():
                return
        try:
            while True:
                piece = on_model_thread(should_stop, next, pieces, None)
                if piece is None:
                    return
                yield piece
        finally:
            model_thread.submit(pieces.close)  # on the model thread too, before the next chat's steps
            chat_lock.release()

    def answer(req, client, should_stop):
        """(text, prompt, snippets, log) for a parsed request: from the model, or typed through."""
        seg, debug = req["segments"], req["debug"] or {}
        log = {"prompt": 0, "reused": 0, "generated": 0, "reason": "typed through", "ms": 0}
        if req["raw_prompt"] is None and req["temperature"] is None and req["seed"] is None:  # not asking for variety
            typed = typed_through(client, req["language"], seg["prefix"], seg["suffix"])
            if typed is not None:
                remember(client, req["language"], seg["suffix"], seg["prefix"], *typed)
                return typed[0], typed[1], [], log
        stops = stop_words(req["language"])
        budget = config["ctx"] - config["max_tokens"]
        snippets, crlf, line_prefix, line_suffix = [], False, "", ""
        if req["raw_prompt"] is not None:  # a debugging aid: used verbatim, special tokens and all
            tokenize = lambda text: fmt["bos"] + llm.tokenize(text.encode(), add_bos=False, special=True)  # noqa: E731
            count = (lambda text: len(text.encode()) // BYTES_PER_TOKEN) if engine else (lambda text: len(tokenize(text)))
            prompt = keep_lines(req["raw_prompt"], lambda text: count(text) <= budget, keep_end=True)
            tokens, size = None if engine else tokenize(prompt), count(prompt)
        else:
            prefix, suffix = seg["prefix"], seg["suffix"] or "\n"  # Tabby's default for no suffix
            crlf = "\r\n" in prefix or "\r\n" in suffix
            if not debug.get("disable_retrieval_augmented_code_completion"):
                snippets = pick_snippets(seg)
            if crlf:
                prefix, suffix = prefix.replace("\r\n", "\n"), suffix.replace("\r\n", "\n")
                snippets = [dict(s, body=s["body"].replace("\r\n", "\n")) for s in snippets]
            line_prefix, line_suffix = prefix[prefix.rfind("\n") + 1:], suffix.split("\n", 1)[0]
            prefix = build_prefix(req["language"], prefix, snippets)
            if not fmt["fim"]:
                suffix = ""
            tokens, prompt, size = make_prompt(prefix, suffix)
            if size > budget:
                tokens, prompt, size = make_prompt(*fit_prompt(prefix, suffix, lambda p, s: make_prompt(p, s)[2], budget))
        tail = prompt[-max(map(len, stops)):]

        def end_of(text):
            ends = [find_stop(text, stops, tail), scope_end(text, line_prefix, line_suffix)]
            return min((i for i in ends if i is not None), default=None)

        temperature, seed = sampling(req, config["temperature"])
        limits = config["max_tokens"], end_of, should_stop, config["time_budget"] / 1000

        def run():
            t = time.perf_counter()
            use_kv_of(client, tokens)
            reused = keep_kv(llm, tokens)
            return finish(generate(model_pieces(llm, tokens, temperature, seed), *limits)) + (reused, (time.perf_counter() - t) * 1000)
        if engine:  # on this thread: the engine serves several at once
            t = time.perf_counter()
            body = engine_body(engine, prompt, config["max_tokens"], temperature, seed)
            pieces = engine_pieces(engine, ENGINES[engine["kind"]][0], engine["kind"], body, should_stop)
            text, log["generated"], reason = finish(generate(pieces, *limits))
            log["ms"] = (time.perf_counter() - t) * 1000
        else:
            text, log["generated"], reason, log["reused"], log["ms"] = on_model_thread(should_stop, run) or ("", 0, "cancelled", 0, 0)
        log.update(prompt=size, reason=reason)
        if crlf:
            text = re.sub(r"(?<!\r)\n", "\r\n", text)
        if text and req["raw_prompt"] is None:
            remember(client, req["language"], seg["suffix"], seg["prefix"], text, prompt)
        return text, prompt, snippets, log

    def make_prompt(prefix, suffix):
        """(tokens, text, size in tokens) of the prompt. An engine gets the text, its size guessed,
        its user code kept from looking like special tokens; a local model gets tokens."""
        if engine:
            text = arrange(fmt, fmt["defang"](prefix), fmt["defang"](suffix))[1]
            return None, text, len(text.encode()) // BYTES_PER_TOKEN
        tokens, text = encode(fmt, prefix, suffix)
        return tokens, text, len(tokens)

    def remember(client, language, suffix, prefix, text, prompt):
        with clients_lock:
            last_answer[client] = {"language": language, "suffix": suffix, "prefix": prefix, "text": text, "prompt": prompt}
            last_answer.move_to_end(client)
            if len(last_answer) > 64:
                last_answer.popitem(last=False)

    return app

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    try:
        config = load_config(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")
    create_app(config).run(host=config["host"], port=config["port"], threaded=True)
