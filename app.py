"""A Tabby-compatible code-completion server in one file: Flask + llama-cpp-python.

It speaks TabbyML Tabby's HTTP API (/v1/health, /v1/completions, /v1/events,
/v1beta/server_setting), so the Tabby extensions for VS Code, Vim and IntelliJ (all of them run
the tabby-agent client) get fill-in-the-middle completions from a local GGUF model.

    python app.py --model ./model.gguf --port 8080
    TABBYPY_MODEL=./model.gguf flask run --port 8080
    python app.py --backend http://gpu-box:8000/v1 --backend-model Qwen/Qwen2.5-Coder-7B

`python app.py --help` lists every option with its environment variable.

The core comes first, a complete server on a local model in the order a request meets it:
config, data tables, the prompt, the editor's cut, parsing, the generation loop, the local model,
the completion service, counters, the events log, routes. After "# Capabilities beyond the core"
comes a section per capability (engines, chat, speculation, drafts, repository context, the
status page and /metrics, tokens per developer, Hugging Face download), which attaches itself
with one line in create_app(), at the end, through what the core offers anyone: delete the
section and that line, and the rest still serves.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import difflib
import errno
import functools
import hmac
import html
import http.client
import itertools
import json
import keyword
import logging
import math
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import typing
import urllib.parse
import uuid

# llama.cpp's OpenMP workers spin on a core for a while after each generation (libgomp's
# default), a core the request around it then misses (bench/README.md). Read when libgomp loads,
# hence here; a value already in the environment wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
try:
    import llama_cpp

    LLAMA_CPP_ERROR = None
except (ImportError, OSError, RuntimeError) as e:  # not installed, or its llama.cpp library cannot
    llama_cpp, LLAMA_CPP_ERROR = None, e  # load (a GPU build without its driver): load_model says
from flask import Flask, abort, g, jsonify, request  # noqa: E402
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

# -----------------------------------------------------------------------------------------------
# Config: the only place knobs live. Each is a flag --key-name and an env var TABBYPY_KEY_NAME.
# The core's are here; each capability adds its own at the top of its section.

ENV_PREFIX = "TABBYPY_"
# fmt: off
CONFIG = {
    "model": ("", "GGUF file (or, with the Hugging Face download, a repo id: owner/repo or "
                  "owner/repo:file.gguf, downloaded once)"),
    "prompt_template": ("", "FIM template in Tabby's syntax, e.g. "
                            "'<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>'; empty: from "
                            "the model's tokens (an engine's: from its name)"),
    "device": ("cpu", "cpu, or gpu to offload every layer (llama-cpp-python must be built with a "
                      "GPU backend)"),
    "ctx": (4096, "context size in tokens: prompt and completion together"),
    "threads": (0, "CPU threads; 0: one per physical core"),
    "repack": ("auto", "llama.cpp's weight repacking (faster Q4_0, Q4_K, ... on a CPU): auto: on, "
                       "unless a test load with it crashes (it does on some CPUs), true or false"),
    "flash_attn": ("auto", "llama.cpp's flash attention: auto: on where the model runs on a GPU "
                           "(as llama-server), off on a CPU (tokens slower there at long "
                           "contexts); true or false"),
    "kv_cache_mb": (1024, "MB of KV caches kept for editors taking turns, so that each gets its "
                          "own back (least recently used dropped first); 0: none"),
    "max_tokens": (64, "most tokens generated per completion (Tabby's max_decoding_tokens)"),
    "completion_cache": (256, "completions kept by prompt, so that a request seen before "
                              "(backspace, undo) is answered without the model; not those that "
                              "ask for their own temperature or seed; 0: none"),
    "temperature": (0.1, "sampling temperature when a request sends none; 0 is greedy"),
    "time_budget": (1000, "ms of generation after which a completion ends at the next line end "
                          "(llama-server's t_max_predict_ms); 0: none"),
    "token": ("", "bearer token every /v1 and /v1beta request (and / and /metrics) must carry; "
                  "empty: no auth"),
    "root": ("~/.tabby", "data directory: events go to ROOT/events/YYYY-MM-DD.json, as Tabby "
                         "writes them"),
    "events": ("meta", "what the events log keeps: meta (ids, language, sizes, timings: no "
                       "code), full (Tabby's layout: the code around the cursor too) or off"),
    "events_days": (0, "days of events kept: older day files are deleted at start-up and daily; "
                       "0: all"),
    "max_body": (1 << 20, "largest request body in bytes; larger ones get 413"),
    "client_telemetry": (False, "let tabby-agent send its anonymous usage statistics to TabbyML"),
    "host": ("127.0.0.1", "address to listen on (python app.py only; flask run has --host)"),
    "port": (8080, "port to listen on (python app.py only; flask run has --port)"),
}
# fmt: on


def convert(value, default, source):
    """A flag or env string as the type of the knob's default; source names it in errors. A
    knob whose default is a tuple takes several values: comma-separated in an env var."""
    if isinstance(default, tuple):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"{source} must be true or false (or yes/no, 1/0), not {value!r}")
    try:
        return type(default)(value)
    except ValueError:
        kind = "an integer" if type(default) is int else f"a {type(default).__name__}"
        raise ValueError(f"{source} must be {kind}, not {value!r}") from None


def unknown(name, names):
    """The error for a setting that is not one, with the nearest that is."""
    near = difflib.get_close_matches(name, names, 1)
    return ValueError(f"unknown setting {name}" + (f" (did you mean {near[0]}?)" if near else ""))


def load_config(argv=(), environ=None):
    """CONFIG's defaults, overlaid by TABBYPY_* environment variables, then by --flags."""
    environ = os.environ if environ is None else environ
    for name in environ:
        if name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX) :].lower() not in CONFIG:
            raise unknown(name, [ENV_PREFIX + key.upper() for key in CONFIG])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    config = {}
    for key, (default, help) in CONFIG.items():
        env = ENV_PREFIX + key.upper()
        repeated = isinstance(default, tuple)  # a flag given once for each value
        shown = str(default).lower() if type(default) is bool else default
        shown = "none" if default in ("", ()) else shown
        kind = {bool: "BOOL", int: "N", float: "X", tuple: "VALUE"}.get(type(default), "TEXT")
        more = ", comma-separated" if repeated else ""
        parser.add_argument("--" + key.replace("_", "-"), dest=key, metavar=kind,
                            action="append" if repeated else "store",
                            help=f"{help} (default: {shown}; env {env}{more})")  # fmt: skip
        config[key] = convert(environ[env], default, env) if env in environ else default
    args, extra = parser.parse_known_args(list(argv))
    if extra:
        raise unknown(extra[0].split("=")[0], ["--" + key.replace("_", "-") for key in CONFIG])
    for key, value in vars(args).items():
        if isinstance(value, list):
            config[key] = tuple(value)
        elif value is not None:
            config[key] = convert(value, CONFIG[key][0], "--" + key.replace("_", "-"))
    return config


def check_config(config):
    """SystemExit with one line naming the flag, for the core's settings that cannot work."""
    auto = ("auto", "true", "false")
    choices = {"device": ("cpu", "gpu"), "repack": auto, "flash_attn": auto,
               "events": ("full", "meta", "off")}  # fmt: skip
    for key, allowed in choices.items():
        if config[key] not in allowed:
            named = f"{', '.join(allowed[:-1])} or {allowed[-1]}"
            raise SystemExit(f"error: --{key} must be {named}, not {config[key]!r}")
    least = {"events_days": 0, "kv_cache_mb": 0, "completion_cache": 0, "threads": 0,
             "temperature": 0, "time_budget": 0, "max_body": 1}  # fmt: skip
    for key, n in least.items():
        if config[key] < n:
            raise SystemExit(f"error: --{key.replace('_', '-')} must be {n} or more")
    if not 0 < config["max_tokens"] < config["ctx"]:
        raise SystemExit(
            f"error: --max-tokens must be at least 1 and less than --ctx ({config['ctx']})"
        )


# -----------------------------------------------------------------------------------------------
# Data tables, in Tabby's own shapes so they can be diffed against upstream.

# The Tabby release whose API we speak: tabby-agent reads version.git_describe as a semver
# and asks for /v1beta/server_setting only from 0.9.0 on.
TABBY_VERSION = "v0.32.0"

# FIM prompt templates (TabbyML/registry-tabby:models.json), tried in order: the first whose
# markers are all special tokens of the model wins. A remote engine's model has no tokens to
# look at: there the first template with a fragment of its (lowercased) model name wins.
# fmt: off
FIM_TEMPLATES = {
    "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>":
        ["starcoder", "codeqwen", "granite", "stable-code"],
    "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>":
        ["codegemma", "qwen2.5-coder", "qwen3-coder"],
    "<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>": ["deepseek-coder"],
    "<PRE> {prefix} <SUF>{suffix} <MID>": ["codellama", "code-llama"],
    "[SUFFIX]{suffix}[PREFIX]{prefix}": ["codestral"],  # suffix first, no middle token
}
# fmt: on
# a special-token marker inside a template: <...> or [UPPER]
MARKER = r"<[^\s<>{}]+>|\[[A-Z]+\]"

# TabbyML/tabby:crates/tabby-common/assets/languages.toml, an entry a line: its language ids, its
# line comment (None: none, so context snippets are left out) and its top-level keywords, each of
# which becomes the stop word "\n" + keyword.
# fmt: off
LANGUAGES = [
    ("python", "#", "def from class import"),
    ("rust", "//", "fn trait impl enum pub extern static trait unsafe use"),
    ("java", "//", "abstract public private class const exports extends implements static import "
                   "interface module package var enum return"),
    ("kotlin", "//", "abstract public private companion class data const actual expect sealed "
                     "suspend fun import interface package var val enum"),
    ("javascript-typescript javascript typescript javascriptreact typescriptreact", "//",
     "abstract async class const export function interface module package type var enum let"),
    ("go", "//", "func interface struct package type import var const"),
    ("ruby", "#", "begin class def end ensure include module require rescue self"),
    ("c", "//", "const enum extern inline register static struct typedef union volatile"),
    ("cpp", "//", "auto class const concept enum extern inline namespace register static struct "
                  "template typedef union volatile"),
    ("csharp", "//", "class struct enum interface abstract static extern namespace using var "
                     "dynamic async"),
    ("php", "//", "abstract class const declare extends final finally function global implements "
                  "include_once include interface namespace private protected public "
                  "require_once require static trait use"),
    ("solidity", "//", "contract interface error library struct enum function type"),
    ("dart", "//", "abstract class late var final const export interface type enum int String "
                   "double DateTime typedef"),
    ("elixir", "#", "def defp defmacro defmacrop module use import alias require if unless case "
                    "cond with try catch throw receive after do end"),
    ("r", "#", "function library install.packages"),
    ("lua", "--", "and break do else elseif end false for function if in local nil not or repeat "
                  "return then true until while"),
    ("scala", "//", "abstract case class def do else enum extends final for given if implicit "
                    "import lazy match new object override package private protected return "
                    "sealed then throw trait try type val var while with yield"),
    ("ocaml", None, "and as assert begin class constraint do done downto else end exception "
                    "external for fun function functor if in include inherit initializer lazy "
                    "let match method module mutable new nonrec object of open private rec sig "
                    "struct then to try type val virtual when while with"),
    ("gdscript", "#", "var const enum func class class_name extends"),
    ("css dockerfile haskell html julia makefile markdown txt perl powershell sql shellscript tex "
     "vb", None, ""),
]
# language id -> (the ids of its entry, line comment, top-level keywords)
LANGUAGE = {name: (names.split(), comment, words.split())
            for names, comment, words in LANGUAGES for name in names.split()}
# fmt: on
# any other language: Tabby's UNKNOWN_LANGUAGE, whose empty line comment makes "\n" a stop word
UNKNOWN_LANGUAGE = ([], "", [])

# Tabby's DEFAULT stop words: a blank line, also followed by indentation (a tokenizer often
# emits "\n\n    " as one piece), and the special tokens of common FIM and chat formats.
# fmt: off
DEFAULT_STOP_WORDS = (
    ["\n\n"] + ["\n\n" + " " * n for n in range(2, 15, 2)]
    + ["\n\n" + "\t" * n for n in range(1, 8)]
    + ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", " <EOT>", "<|fim_prefix|>",
       "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>", "<|system|>", "<|user|>",
       "<|end|>", "<|assistant|>"]
)
# fmt: on

SNIPPET_BUDGET = 768  # characters of declarations and snippets put before the prefix (Tabby's)
SNIPPET_LISTS = ["declarations", "relevant_snippets_from_changed_files",  # in the order they get
                 "relevant_snippets_from_recently_opened_files"]  # the budget  # fmt: skip
PREFIX_STEP = 16  # lines a too-long prefix loses at a time, so its start (and the KV cache) stays
SAMPLE_CHARS = 1024  # a longer line's tokens are estimated from those of its start
KV_KEPT = 32  # tokens of the KV cache that a new prompt must drop for a copy to be kept
# llama.cpp attends over the KV cache up to the next multiple of 256 cells past the last one used:
# a prompt's batches end on such multiples (one just past attends over 255 empty cells)
KV_PAD = 256
LAST_ANSWERS = 64  # clients whose last answer is kept, for typed-through answers

# -----------------------------------------------------------------------------------------------
# Prompt building: pure functions, no Flask, no model.


def stop_words(language):
    """Tabby's stop words for a language: DEFAULT, "\\n" + its line comment, "\\n" + each
    top-level keyword."""
    _, comment, keywords = LANGUAGE.get(language, UNKNOWN_LANGUAGE)
    comment = [] if comment is None else ["\n" + comment]
    return DEFAULT_STOP_WORDS + comment + ["\n" + kw for kw in keywords]


def find_stop(text, words, tail=""):
    """Where generated text ends for the earliest stop word in tail + text that ends inside text,
    or None. tail is the end of the prompt: as in Tabby, a stop word may begin there (Tabby looks
    at the end after each token; the whole text also catches a stop word inside one token)."""
    both = tail + text
    hits = [both.find(w, max(0, len(tail) - len(w) + 1)) for w in words]
    hit = min((i for i in hits if i >= 0), default=None)
    return None if hit is None else max(0, hit - len(tail))


def pick_snippets(segments):
    """Declarations, then snippets from changed files, then from recently opened files, while
    their bodies fit Tabby's 768-character budget; a body that does not fit ends its list."""
    used, picked = 0, []
    for key in SNIPPET_LISTS:
        for snippet in segments.get(key) or []:
            size = len(snippet["body"].encode())  # bytes, as Rust's len()
            if used + size > SNIPPET_BUDGET:
                break
            used += size
            picked.append({**snippet, "score": snippet.get("score", 1.0)})
    return picked


def build_prefix(language, prefix, snippets):
    """The prefix after a comment block of the snippets, each under a "Path:" line, as Tabby
    writes it."""
    comment = LANGUAGE.get(language, UNKNOWN_LANGUAGE)[1]
    if not snippets or not comment:  # no line comment, no way to hide code from the model
        return prefix
    lines = []
    for i, snippet in enumerate(snippets):
        lines += [f"Path: {snippet['filepath']}"] + snippet["body"].splitlines()
        if i < len(snippets) - 1:
            lines.append("")
    return "\n".join(f"{comment} {line}" if line else comment for line in lines) + "\n" + prefix


# --- Where the editor cuts: tabby-agent's post-processing, mirrored. The agent (1.5.0, what the
# Tabby extensions run; TabbyML/tabby clients/tabby-agent/src/postprocess/) keeps a completion
# only as far as its indentation scope, and in the middle of a line only its first line. The
# server stops generating where the agent is sure to cut, so that nothing it would show is lost.

CLOSING = re.compile(r"(?:[)\]}>\"'`]|/>)*")  # the agent's "only closing characters" (fill-in-line)


class Cursor(typing.NamedTuple):
    """What the agent's cut depends on, besides the completion."""

    line_prefix: str  # the cursor line before the cursor
    reference: int | None  # indent of the last non-blank line before the cursor; None: none
    below: int | None  # indent of the first non-blank line after the cursor line; None: none
    fill_in_line: bool  # the cursor line goes on with more than closing characters
    python: bool  # Python: a closing line after a blank line is not kept


def indent(line):
    """A line's indentation as the agent counts it: spaces and tabs, one each."""
    return len(line) - len(line.lstrip(" \t"))


NO_CURSOR = Cursor("", None, None, False, False)  # a raw prompt's: the editor's cut is not known


def cursor_of(prefix, suffix, language):
    """The Cursor of a document whose text around the cursor is prefix and suffix (LF line ends)."""
    before, after = prefix.split("\n"), suffix.split("\n")
    reference = next((indent(line) for line in reversed(before) if line.strip()), None)
    below = next((indent(line) for line in after[1:] if line.strip()), None)
    fill_in_line = not CLOSING.fullmatch(after[0].rstrip())
    return Cursor(before[-1], reference, below, fill_in_line, language == "python")


def scope_ended(text, cursor):
    """Whether tabby-agent is sure to cut text before its end, so that more text would be thrown
    away: its "limit scope by indentation" has found the line that leaves the scope (and, when it
    keeps that line as the closing line, the line after it has begun). In the middle of a line
    it keeps the first line only: see text_end."""
    lines = text.split("\n")  # the last one is still being written
    if cursor.reference is None:
        return False  # a blank prefix: the agent cuts nothing

    def known(i):  # whether lines[i]'s indentation (and blankness) is known
        return i < len(lines) - 1 or lines[i].strip() != ""

    def indent_of(i):  # the first line follows the cursor line's text
        return indent(cursor.line_prefix + lines[0]) if i == 0 else indent(lines[i])

    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None or not known(first):
        return False
    completing_line = first == 0 and cursor.line_prefix.strip() != ""
    limit = cursor.reference + (completing_line or indent_of(first) > cursor.reference)
    for i in range(1, len(lines)):
        if not known(i):
            return False
        if not lines[i].strip() or indent(lines[i]) >= limit:
            continue
        if indent_of(i - 1) > indent(lines[i]):  # it closes a block; does it open one too?
            if i + 1 == len(lines) or not known(i + 1):
                return False
            if indent(lines[i]) < indent(lines[i + 1]):  # `} else {`, `else:`: still in scope
                continue
        allowed = not completing_line or indent_of(0) < indent_of(1)  # the line opened a block
        allowed = allowed and (cursor.below is None or cursor.below < limit)
        if not allowed or (cursor.python and not lines[i - 1].strip()):
            return True  # the line that leaves the scope is not kept
        return i + 1 < len(lines) and known(i + 1)  # it is: the closing line, once whole
    return False


def text_end(text, stops, tail, cursor):
    """Where a completion's text ends: at the earliest of Tabby's stop words (see find_stop); in
    the middle of a line, after the first line's newline once what follows cannot begin a stop
    word there (a Tabby server answers the first line alone then, and the agent trims it only
    when a second line follows); else at its end once the editor is sure to cut (scope_ended)."""
    stop = find_stop(text, stops, tail)
    if stop is not None:
        return stop
    if cursor.fill_in_line:
        newline = text.find("\n")
        after = text[newline:]
        if newline < 0 or any(word.startswith(after) for word in stops):
            return None
        return newline + 1
    return len(text) if scope_ended(text, cursor) else None


# --- The prompt: the request's text in the model's template, fitted to the context.


class Document(typing.NamedTuple):
    """A request's text as the prompt holds it: LF line ends, the snippets' comment block before
    the prefix, no suffix for a prefix-only format."""

    prefix: str
    suffix: str
    cursor: Cursor  # what the editor's cut depends on
    snippets: list  # the request's snippets that made it into the prompt
    crlf: bool  # the file has CRLF line ends, and so must the answer


def document(language, segments, fim, snippets):
    """The Document of a completion request's segments, with snippets (pick_snippets()'s, and
    the repository's) in a comment block before the prefix."""
    prefix, suffix = segments["prefix"], segments["suffix"] or "\n"  # Tabby's default: "\n"
    crlf = "\r\n" in prefix or "\r\n" in suffix
    picked = snippets
    if crlf:
        prefix, suffix = prefix.replace("\r\n", "\n"), suffix.replace("\r\n", "\n")
        picked = [dict(s, body=s["body"].replace("\r\n", "\n")) for s in picked]
    cursor = cursor_of(prefix, suffix, language)
    prefix = build_prefix(language, prefix, picked)
    return Document(prefix, suffix if fim else "", cursor, picked, crlf)


class PromptFormat(typing.NamedTuple):
    """A FIM template as start-up finds it for the model (template_format), for every request."""

    template: str  # in Tabby's syntax: "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
    specials: dict  # each marker in it -> its token id (a local model), or itself (an engine)
    parts: list  # the template split at its markers and slots
    fim: bool  # it has a {suffix}: else prompts are prefix-only
    line_last: bool  # the cursor line may go after it (see arrange)


def template_format(template, specials):
    """The PromptFormat of a template whose markers are the keys of specials, its parts
    '<PRE> {prefix} <SUF>{suffix} <MID>' -> ['<PRE>', ' ', '{prefix}', ' ', '<SUF>', ...]."""
    names = ["{prefix}", "{suffix}"] + sorted(specials, key=len, reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, names)) + ")", template)
    return PromptFormat(template, specials, [part for part in parts if part],
                        "{suffix}" in template, not template.endswith("{prefix}"))  # fmt: skip


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


def arrange(fmt, prefix, suffix):
    """(pieces, text) of the prompt for prefix and suffix: fill_template()'s, except that code
    typed on the cursor line goes after the template, as the start of the middle (llama.cpp's
    infill does so): each keystroke then only adds to the end, and the KV cache keeps the rest.
    An indentation-only line stays: Tabby's prompt."""
    line = prefix[prefix.rfind("\n") + 1 :] if fmt.line_last else ""
    line = line if line.strip() else ""
    above = prefix[: len(prefix) - len(line)]
    pieces, text = fill_template(fmt.parts, fmt.specials, above, suffix)
    return pieces + [line], text + line


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
    end = (lambda seq, n: seq[len(seq) - n :]) if keep_end else (lambda seq, n: seq[:n])
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
    short = keep_lines(suffix, lambda s: count("", s) <= room, keep_end=False)
    fits = lambda p: count(p, short) <= budget  # noqa: E731
    prefix = keep_lines(prefix, fits, keep_end=True, step=PREFIX_STEP)
    return prefix, keep_lines(suffix, lambda s: count(prefix, s) <= budget, keep_end=False)


# -----------------------------------------------------------------------------------------------
# Request parsing: a body in, a named record out, or a 400 that says what was expected.

KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
         list: "a list", dict: "an object"}  # fmt: skip


def clean(text):
    """text with lone surrogates (valid JSON, not valid UTF-8) replaced by U+FFFD."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def json_body(data):
    """The JSON object a request body holds, or a 400."""
    try:
        body = json.loads(data)
    except UnicodeDecodeError:
        abort(400, "body is not valid UTF-8")
    except ValueError as e:
        abort(400, f"body is not valid JSON: {e}")
    except RecursionError:  # json's parser recurses once per [ or {
        abort(400, "body is not valid JSON: it is nested too deeply")
    if not isinstance(body, dict):
        abort(400, "body must be a JSON object")
    return body


def get(obj, key, kind, where="", required=False):
    """obj[key] if it is of kind (None when absent or null); strings come back clean()ed."""
    value = obj.get(key)
    if value is None:
        if required:
            abort(400, f"{where}{key} is required")
        return None
    if kind is float:
        try:
            ok = not isinstance(value, bool) and math.isfinite(value)
        except (TypeError, OverflowError):  # not a number, or an integer past any float
            ok = False
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        abort(400, f"{where}{key} must be {KINDS[kind]}")
    return clean(value) if kind is str else value


@dataclasses.dataclass
class CompletionRequest:
    """A /v1/completions body, checked."""

    segments: dict  # as sent (strings clean()ed), and so logged; no prefix for a raw prompt
    language: str = "unknown"
    user: str | None = None
    temperature: float | None = None  # None: the server's
    seed: int | None = None  # None: a random one
    raw_prompt: str | None = None  # debug_options.raw_prompt: sent as it is, special tokens too
    debug_data: bool = False  # debug_options was sent: the answer has debug_data
    return_snippets: bool = False
    return_prompt: bool = False
    retrieval: bool = True  # not debug_options.disable_retrieval_augmented_code_completion

    @property
    def wants_variety(self):
        """It asks for a temperature or seed of its own, so an earlier answer will not do."""
        return self.temperature is not None or self.seed is not None


def parse_snippet(item, where):
    """One of a request's snippets, {filepath, body, score?}, or a 400 naming where it is."""
    if not isinstance(item, dict):
        abort(400, f"{where} must be an object")
    snippet = {"filepath": get(item, "filepath", str, where + ".", True),
               "body": get(item, "body", str, where + ".", True),
               "score": get(item, "score", float, where + ".")}  # fmt: skip
    return {k: v for k, v in snippet.items() if v is not None}


def parse_completion(body):
    """A /v1/completions body as a CompletionRequest; unknown fields are ignored, as Tabby does."""
    debug = get(body, "debug_options", dict)
    raw_prompt = get(debug or {}, "raw_prompt", str, "debug_options.")
    segments = get(body, "segments", dict, required=raw_prompt is None) or {}
    req = CompletionRequest({}, get(body, "language", str) or "unknown", get(body, "user", str),
                            get(body, "temperature", float), get(body, "seed", int), raw_prompt,
                            debug is not None)  # fmt: skip
    if get(body, "mode", str) not in (None, "standard"):
        abort(400, 'mode must be "standard" (next_edit_suggestion is not supported)')
    if req.temperature is not None and req.temperature < 0:
        abort(400, "temperature must be 0 or more")
    if req.seed is not None and req.seed < 0:
        abort(400, "seed must be 0 or more")
    option = lambda key: bool(get(debug or {}, key, bool, "debug_options."))  # noqa: E731
    req.return_snippets, req.return_prompt = option("return_snippets"), option("return_prompt")
    req.retrieval = not option("disable_retrieval_augmented_code_completion")
    if raw_prompt is None:
        req.segments["prefix"] = get(segments, "prefix", str, "segments.", required=True)
    for key in ("suffix", "filepath", "git_url", "clipboard"):
        req.segments[key] = get(segments, key, str, "segments.")
    for key in SNIPPET_LISTS:
        items = get(segments, key, list, "segments.")
        if items is not None:
            where = f"segments.{key}"
            req.segments[key] = [
                parse_snippet(item, f"{where}[{i}]") for i, item in enumerate(items)
            ]
    return req


# what the server logs of its own answers (and of requests that its client abandoned)
SERVER_EVENTS = ("completion", "completion_cancelled", "chat_completion")


def parse_event(body, select_kind=None):
    """A /v1/events body as the event to log, in Tabby's layout: {type: {fields}}. select_kind
    is the ?select_kind= of a partial accept."""
    kind = get(body, "type", str, required=True)
    if kind in SERVER_EVENTS:
        abort(400, f"type {kind} is the server's own record of what it served, not an event")
    fields = {"completion_id": get(body, "completion_id", str, required=True),
              "choice_index": get(body, "choice_index", int, required=True),
              "view_id": get(body, "view_id", str), "elapsed": get(body, "elapsed", int),
              "kind": None if select_kind is None else clean(select_kind)}  # fmt: skip
    return {kind: {k: v for k, v in fields.items() if v is not None}}


Sampling = collections.namedtuple("Sampling", "temperature seed")  # (a 32-bit seed: llama.cpp's)


def sampling(req, temperature):
    """The Sampling of a request: its own temperature, else the server's; its seed, else a random
    one (not the clock's: two requests in one millisecond would get one sample)."""
    seed = req.seed if req.seed is not None else random.getrandbits(32)
    temperature = req.temperature if req.temperature is not None else temperature
    return Sampling(temperature, seed & 0xFFFFFFFF)


# -----------------------------------------------------------------------------------------------
# The generation loop: every reason to stop generating is a check in generate().


class Limits(typing.NamedTuple):
    """What ends a generation, besides its pieces running out (see generate)."""

    max_tokens: int | float
    end_of: typing.Callable = lambda text: None  # where the text ends (stop words, scope), or None
    should_stop: typing.Callable = lambda: False  # the client is gone
    budget: float = 0  # seconds, then the text ends at the next line end; 0: none


def generate(pieces, max_tokens, end_of=lambda text: None, should_stop=lambda: False, budget=0):
    """The one generation loop, over the pieces a model or an engine generates (bytes or str,
    about a token each; empty while it is busy), until: they end ("eos"); end_of(text) says where
    the text ends ("stop"); max_tokens ("length"); budget seconds spent, then at the next line end
    ("time"); should_stop(), the client hung up ("cancelled", no text). Then it closes pieces (an
    engine's connection drops). Yields the text so far after each piece (for streaming); returns
    (text, pieces taken, reason): run it with finish() when only that matters."""
    raw, text, n, start, late = b"", "", 0, time.monotonic(), None
    try:
        for piece in pieces:
            if should_stop():
                return "", n, "cancelled"
            if not piece:
                continue
            n += 1
            raw += piece if isinstance(piece, bytes) else piece.encode()
            # a character split across tokens shows up once whole
            before, text = len(text), raw.decode("utf-8", "ignore")
            end = end_of(text)
            if end is not None:
                return text[:end], n, "stop"
            if budget and late is None and time.monotonic() - start > budget:
                late = before  # llama-server's t_max_predict_ms: the line being written may end
            if late is not None and "\n" in text[late:]:
                return text[: text.index("\n", late)], n, "time"
            if n >= max_tokens:
                return text, n, "length"
            yield text
        # the pieces may have ended for should_stop
        return ("", n, "cancelled") if should_stop() else (text, n, "eos")
    finally:
        pieces.close()


def finish(steps):
    """Run a generate() to its end; -> what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


class Answer(typing.NamedTuple):
    """A completion: a backend's (text, reason, tokens, ms), then the service's (and its prompt)."""

    text: str
    prompt: str = ""  # as Tabby logs it
    reason: str = ""  # generate()'s, or "typed through", "cached", "speculated" (made ahead)
    snippets: list = []  # in the prompt: the editor's, and any others
    size: int = 0  # prompt tokens
    reused: int = 0  # of them, already in the KV cache
    generated: int = 0  # tokens
    ms: float = 0  # in the model (or engine)


# -----------------------------------------------------------------------------------------------
# The local model: llama.cpp through llama-cpp-python, on one thread of its own.


# a prompt: its tokens (a local model's: an engine tokenizes the text itself), its text (as Tabby
# logs it) and its size in tokens (an engine's: estimated)
Prompt = collections.namedtuple("Prompt", "tokens text size")


def physical_cores():
    """Cores this machine has, not counting hyper-threads: llama.cpp runs best with one thread
    each."""
    try:
        with open("/proc/cpuinfo") as f:
            cpus = [cpu.splitlines() for cpu in f.read().split("\n\n") if "core id" in cpu]
        ids = ("physical id", "core id")
        cores = {tuple(line for line in cpu if line.startswith(ids)) for cpu in cpus}
        return max(1, min(len(cores), len(os.sched_getaffinity(0))))
    except (OSError, AttributeError):
        return os.cpu_count() or 1


def load_model(config, path, flag="--model"):
    """A llama_cpp.Llama for a --model (or --chat-model) file, or SystemExit with one line that
    says what to fix."""
    if llama_cpp is None and isinstance(LLAMA_CPP_ERROR, ImportError):
        raise SystemExit(f"error: {flag} needs llama-cpp-python: pip install llama-cpp-python "
                         "(or use --backend URL of an engine)")  # fmt: skip
    if llama_cpp is None:
        raise SystemExit(f"error: {flag}: llama-cpp-python cannot load llama.cpp "
                         f"({LLAMA_CPP_ERROR}); a GPU build needs the GPU's driver and runtime "
                         "(or reinstall the CPU build: pip install --force-reinstall "
                         "--no-cache-dir llama-cpp-python)")  # fmt: skip
    if not os.path.isfile(path):
        raise SystemExit(f"error: {flag} {path}: no such file")
    if config["device"] == "gpu" and not llama_cpp.llama_supports_gpu_offload():
        raise SystemExit("error: --device gpu: this llama-cpp-python was built without a GPU "
                         'backend (reinstall it with CMAKE_ARGS="-DGGML_CUDA=on", see '
                         "README)")  # fmt: skip
    settings = {key: config[key] for key in ("ctx", "threads", "device")}
    flash, gpu = config["flash_attn"], config["device"] == "gpu"  # auto: on a GPU only
    settings["flash_attn"] = flash == "true" or flash == "auto" and gpu
    repack = config["repack"] == "true"
    if config["repack"] == "auto":
        stat = os.stat(path)
        repack = safe_repack(path, (stat.st_mtime_ns, stat.st_size), json.dumps(settings), flag)
    try:
        return llama(path, settings, repack)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {flag} {path}: cannot load it as a GGUF model ({e})") from None


@contextlib.contextmanager
def repacking(on):
    """llama.cpp's weight repacking (use_extra_bufts) on or off for a Llama made meanwhile: Llama()
    has no argument for it, so llama_model_default_params() is wrapped (a hack: one at a time)."""
    module, default = llama_cpp.llama_cpp, llama_cpp.llama_cpp.llama_model_default_params

    def params():
        made = default()
        made.use_extra_bufts = on
        return made

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default


@(llama_cpp.llama_log_callback if llama_cpp else lambda f: f)
def llama_log(level, text, _):
    """llama.cpp's errors (as verbose=False), but for two that are none (see abortable)."""
    if level == 3 and not re.search(rb"full-size SWA cache|removing memory module", text):
        sys.stderr.write(text.decode(errors="replace"))


def llama(path, settings, repack):
    """The Llama of a GGUF file, with load_model's settings (ctx, threads, flash_attn, device)."""
    llama_cpp.llama_log_set(llama_log, None)
    threads, gpu = settings["threads"] or physical_cores(), settings["device"] == "gpu"
    with repacking(repack):
        return llama_cpp.Llama(model_path=path, n_ctx=settings["ctx"], n_threads=threads,
                               n_threads_batch=threads, n_batch=512, verbose=False,
                               flash_attn=settings["flash_attn"],
                               n_gpu_layers=-1 if gpu else 0)  # fmt: skip


# A test load runs app.py in a child process: llama.cpp that crashes there (a segfault in its
# weight repacking on some CPUs, the kernel killing it for memory) kills nobody else.
TRIAL = "import runpy, sys; runpy.run_path(sys.argv[1])['trial_load'](*sys.argv[2:])"
TRIAL_SECONDS = 300  # the most a test load may take: a large model read from a slow disk


def trial_load(path, settings, repack):
    """In the child: load the model as the server will, then decode a few tokens."""
    try:
        llm = llama(path, json.loads(settings), repack == "True")
    except (ValueError, RuntimeError):  # not a crash: the server's own load says what it is
        return
    finish(generate(model_pieces(llm, llm.tokenize(b"def main():\n    ", add_bos=True), 0, 0), 3))


def trial(path, settings, repack):
    """None when a test load (see trial_load) ends well, else how it ended."""
    args = [sys.executable, "-c", TRIAL, os.path.abspath(__file__), path, settings, str(repack)]
    try:
        status = subprocess.run(args, capture_output=True, timeout=TRIAL_SECONDS).returncode
    except subprocess.TimeoutExpired:
        return f"did not end within {TRIAL_SECONDS} s"
    if status < 0:
        return f"died of {signal.Signals(-status).name}"
    return f"exited with status {status}" if status else None


@functools.lru_cache(maxsize=None)  # each model file once: the tests make many servers of one
def safe_repack(path, stat, settings, flag):
    """--repack auto: whether repacking stays on, told by test loads in a child process: yes when
    one with it ends well, no when one without it does, else SystemExit. stat: the file's."""
    why = trial(path, settings, True)
    if why is None:
        return True
    if trial(path, settings, False) is None:
        print(f"warning: {flag} {os.path.basename(path)}: a test load with llama.cpp's weight "
              f"repacking on {why}: serving with it off, a little slower (--repack false skips "
              "the test load; --repack true forces repacking)", file=sys.stderr)  # fmt: skip
        return False
    hint = " (is the GPU's driver installed, and the GPU free?)" if '"gpu"' in settings else ""
    if "SIGKILL" in why:  # the kernel's out-of-memory killer, most likely
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
        hint = (f" (out of memory? the file is {os.path.getsize(path) >> 20} MB and {free} MB "
                "are free: try a smaller model, or a smaller --ctx)")  # fmt: skip
    raise SystemExit(f"error: {flag} {path}: llama.cpp cannot load it: a test load {why}{hint}")


def special_token(llm, text):
    """The id of the special token spelled text, or None when the model has no such token."""
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    plain = llm.tokenize(text.encode(), add_bos=False, special=False)
    return ids[0] if len(ids) == 1 and ids != plain else None


def find_template(llm, override):
    """(template, {marker: token id}) for the model: --prompt-template, else the first known
    family whose markers it has, else one built from llama.cpp's FIM ids, else prefix only."""
    for template in [override] if override else FIM_TEMPLATES:
        specials = {m: special_token(llm, m) for m in re.findall(MARKER, template)}
        if None not in specials.values():
            return template, specials
        if override:
            missing = next(m for m, i in specials.items() if i is None)
            raise SystemExit(f"error: --prompt-template: {missing!r} is not a special token of "
                             "this model (a model without FIM tokens can only complete from "
                             "the prefix: leave the template empty)")  # fmt: skip
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ids = [fim(vocab) for fim in (llama_cpp.llama_vocab_fim_pre, llama_cpp.llama_vocab_fim_suf,
                                  llama_cpp.llama_vocab_fim_mid)]  # fmt: skip
    if min(ids) < 0:
        return "{prefix}", {}
    pre, suf, mid = (llama_cpp.llama_vocab_get_text(vocab, i).decode(errors="replace") for i in ids)
    return f"{pre}{{prefix}}{suf}{{suffix}}{mid}", dict(zip((pre, suf, mid), ids))


def tokenize_text(llm, text, protected):
    """User text as tokens with special parsing off. llama.cpp still matches user-defined tokens
    (some GGUFs mark FIM tokens so), so any protected token found is spelled out as text."""
    plain = lambda data: llm.tokenize(data, add_bos=False, special=False)  # noqa: E731
    ids = plain(text.encode())
    if not protected.intersection(ids):
        return ids
    out = []
    for i in ids:
        if i in protected:  # split its spelling in two, so neither half can match the token
            spelling = llm.detokenize([i], special=True)
            out += plain(spelling[:1]) + plain(spelling[1:])
        else:
            out.append(i)
    return out


def token_bytes(vocab, token):
    """The bytes of one token (llama-cpp-python's detokenize garbles pieces over 32 bytes)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, 64, 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, -n, 0, False)
    return buf.raw[:n]


def common_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def save_kv(llm, buffer):
    """(tokens, buffer, bytes) of what the KV cache holds: llama.cpp's own copy of its sequence,
    written into buffer (llama_state_seq_get_size() bytes or more)."""
    size = llama_cpp.llama_state_seq_get_data(llm.ctx, buffer, len(buffer), 0)
    return llm.input_ids[: llm.n_tokens].tolist(), buffer, size


def load_kv(llm, saved):
    """Put a save_kv() copy back into the KV cache (a memory copy, instead of evaluating it
    again)."""
    tokens, buffer, size = saved
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), 0, -1, -1)
    loaded = llama_cpp.llama_state_seq_set_data(llm.ctx, buffer, size, 0) > 0
    llm.input_ids[: len(tokens)] = tokens
    llm.n_tokens = len(tokens) if loaded else 0


def keep_kv(llm, tokens):
    """Keep what the KV cache holds of the start of tokens (but the last, whose logits a decode
    must make for the first token), drop the rest; -> how many tokens it keeps."""
    reused = common_prefix(llm.input_ids[: llm.n_tokens].tolist(), tokens[:-1])
    llm.n_tokens = reused  # eval() drops the KV cache from here on
    return reused


@contextlib.contextmanager
def abortable(llm, should_stop, every=0.005):
    """Within it, a decode of llm asks should_stop() (once in every seconds at most) after each
    step of the graph, through llama.cpp's abort callback; on a yes llm.eval raises aborted
    (llama.cpp drops that batch). The callback set before, if any, comes back after."""
    last = [time.monotonic()]  # when should_stop() was last asked (a list: abort sets it)

    def abort(_):
        if every and time.monotonic() - last[0] < every:
            return False
        last[0] = time.monotonic()
        return bool(should_stop())

    before = getattr(llm, "abort_callback", None)
    llm.abort_callback = llama_cpp.ggml_abort_callback(abort)  # kept alive while it is set
    llama_cpp.llama_set_abort_callback(llm.ctx, llm.abort_callback, None)
    try:
        yield
    finally:
        llm.abort_callback = before
        llama_cpp.llama_set_abort_callback(llm.ctx, before or llama_cpp.ggml_abort_callback(), None)


def aborted(error):
    """Whether error is llm.eval's when an abortable() decode stopped (others are failures)."""
    return isinstance(error, RuntimeError) and str(error) == "llama_decode returned 2"


def eval_prompt(llm, tokens, should_stop, every=0.005):
    """Evaluate tokens after what the KV cache holds, in full batches (64-token chunks cost a
    quarter more) that end on multiples of KV_PAD (the first is shorter), abortable() by
    should_stop, so that a client that hangs up stops even a long batch; -> whether it evaluated
    them all. (Not during generation: the callback costs a call with the GIL a graph step.)"""
    pad = min(KV_PAD, llm.n_batch)
    first = llm.n_batch - llm.n_tokens % pad if len(tokens) > llm.n_batch else len(tokens)
    try:
        with abortable(llm, should_stop, every):
            llm.eval(tokens[:first])
            if tokens[first:]:
                llm.eval(tokens[first:])  # (in llm.n_batch tokens at a time)
        return True
    except RuntimeError as e:
        if not aborted(e):
            raise
        return False


def model_tokens(llm, tokens, temperature, seed, should_stop=lambda: False, every=0.005):
    """The ids of the tokens the model generates after tokens, until an end-of-generation or
    other special token. What keep_kv() did not keep is evaluated first with eval_prompt(), the
    last token too (llm.generate() then samples at once: on its own it would cost a decode more);
    nothing comes when should_stop() cuts that short."""
    todo = tokens[llm.n_tokens :]
    if not tokens or todo and not eval_prompt(llm, todo, should_stop, every):
        return  # (an empty prompt: a model without a BOS token has nothing to go on)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    is_eog, is_control = llama_cpp.llama_vocab_is_eog, llama_cpp.llama_vocab_is_control
    llm.set_seed(seed)
    for token in llm.generate(tokens, temp=temperature, repeat_penalty=1.0):
        if is_eog(vocab, token) or is_control(vocab, token):
            return
        yield token


def model_pieces(llm, tokens, temperature, seed, should_stop=lambda: False):
    """The bytes of each token that model_tokens() gives."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return (
        token_bytes(vocab, t) for t in model_tokens(llm, tokens, temperature, seed, should_stop)
    )


class LocalModel:
    """llama.cpp in this process: the core's backend. It owns the Llama, the one thread that runs
    it and the KV caches of editors taking turns. A backend has prompt(prefix, suffix, head),
    raw_prompt(text), count(text), complete(prompt, sampling, limits, reuse) -> Answer,
    describe(), health(), figures() and name, device, format (its PromptFormat)."""

    def __init__(self, config, path=None):
        self.llm = load_model(config, path or config["model"])
        self.ctx = config["ctx"]
        self.format = template_format(*find_template(self.llm, config["prompt_template"]))
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.bos = [self.llm.token_bos()] if llama_cpp.llama_vocab_get_add_bos(self.vocab) else []
        protected = {self.llm.token_bos(), self.llm.token_eos(), *self.format.specials.values()}
        # While the user types on a line, only that line changes: the other pieces of the prompt
        # (the text above, the suffix) come from here instead of the tokenizer.
        tokenize = lambda text: tuple(tokenize_text(self.llm, text, protected))  # noqa: E731
        self.tokenize = functools.lru_cache(maxsize=64)(tokenize)
        model = config["model"]
        self.name = os.path.basename(model) if os.path.exists(model) else model
        # /v1/health's device (what llama.cpp offloads to) and cuda_devices (the GPUs' names)
        offload = llama_cpp.llama_print_system_info().decode()
        kinds = [kind for kind in ("CUDA", "Metal", "Vulkan", "ROCm", "SYCL") if kind in offload]
        self.device = (kinds + ["gpu"])[0].lower() if config["device"] == "gpu" else "cpu"
        self.gpus = []
        if self.device == "cuda":
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                ask = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
                out = subprocess.run(ask, capture_output=True, text=True, timeout=10).stdout
                self.gpus = out.splitlines()
        # The model runs on a thread of its own: a Llama is not thread-safe, flask run serves
        # each request on a new thread, and llama.cpp's OpenMP workers belong to the calling
        # thread. Its jobs (a request, a chat step, work in idle time) queue for it first come
        # first served: one editor's stream of requests cannot starve another's.
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.waiting, self.waiting_lock = 0, threading.Lock()  # requests queued, not begun
        # Copies of the KV cache kept when another prompt took its place (least recently used
        # first, --kv-cache-mb in all, free buffers too), so that editors taking turns get theirs
        # back instead of evaluating their prompts again; found by what they hold (editors cannot
        # be told apart). On the model thread only, as are the tokens made in idle time for a
        # prompt ({prompt tokens: tokens}, one at a time), which a request of it goes on from, and
        # whether the KV cache holds finished work of idle time.
        self.kv_saved, self.kv_bytes, self.kv_ids = collections.OrderedDict(), 0, itertools.count()
        self.kv_free, self.kv_limit = [], config["kv_cache_mb"] << 20
        self.ahead, self.idle_kv = {}, False
        warm_up = model_pieces(self.llm, self.prompt("def main():\n    ", "\n").tokens, 0, 0)
        self.thread.submit(finish, generate(warm_up, 2)).result()  # pages in the weights, starts
        # the OpenMP workers

    def describe(self):
        how = "no FIM tokens, prefix-only prompts"
        how = f"FIM template {self.format.template!r}" if self.format.fim else how
        flash = "on" if self.health()["flash_attn"] else "off"
        off = "" if self.llm.model_params.use_extra_bufts else ", weight repacking off"
        return [f"model {self.name}: {how}; ctx {self.ctx}, {self.llm.context_params.n_threads} "
                f"threads, device {self.device}, flash attention {flash}{off}"]  # fmt: skip

    def health(self):
        flash = self.llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        return {"flash_attn": flash, "cuda_devices": self.gpus}

    def prompt(self, prefix, suffix, head=None):
        """The template's special tokens as ids, the rest tokenized as plain text; head (a
        Prompt) before it."""
        pieces, text = arrange(self.format, prefix, suffix)
        tokens = self.bos + (head.tokens if head else [])
        for p in pieces:
            tokens += [p] if isinstance(p, int) else self.tokenize(p)
        return Prompt(tokens, (head.text if head else "") + text, len(tokens))

    def raw_prompt(self, text):
        """A prompt as it is, special tokens and all (debug_options.raw_prompt)."""
        tokens = self.bos + self.llm.tokenize(text.encode(), add_bos=False, special=True)
        return Prompt(tokens, text, len(tokens))

    def count(self, text):
        """Tokens in text, as a part of a prompt (about: text is tokenized on its own)."""
        return len(self.llm.tokenize(text.encode(), add_bos=False, special=False))

    def complete(self, prompt, sampling, limits, reuse=False):
        """The Answer to prompt, on the model thread when its turn comes (or "cancelled" while it
        waits, without touching the model); with reuse (no temperature or seed of the request's
        own), going on from tokens made ahead for this prompt, if any."""

        def run():
            if limits.should_stop():  # gone while it waited: the KV cache stays as it is
                return Answer("", reason="cancelled")
            t = time.perf_counter()
            done = self.ahead.get(tuple(prompt.tokens), []) if reuse else []
            tokens = prompt.tokens + done  # (a new list: done may be made ahead still)
            self.use_kv_for(tokens)
            reused = min(keep_kv(self.llm, tokens), prompt.size)

            def pieces():  # (yield from: closing it closes model_pieces)
                yield from (token_bytes(self.vocab, token) for token in done)
                yield from model_pieces(self.llm, tokens, *sampling, limits.should_stop)

            text, n, reason = finish(generate(pieces(), *limits))
            ms = (time.perf_counter() - t) * 1000
            return Answer(text, reason=reason, reused=reused, generated=n, ms=ms)

        return self.on_thread(limits.should_stop, run) or Answer("", reason="cancelled")

    def on_thread(self, should_stop, work, *args):
        """work(*args) run on the model thread when its turn comes, or None when should_stop()
        while it waits. Once started, work checks should_stop itself, and this thread sleeps
        until it ends (waking every 10 ms took a core from the model's threads, for nothing)."""
        started = threading.Event()

        def begin():
            started.set()
            self.count_waiting(-1)
            return work(*args)

        self.count_waiting(1)
        future = self.thread.submit(begin)
        while not started.wait(0.01):
            if should_stop() and future.cancel():
                self.count_waiting(-1)
                return None
        return future.result()

    def count_waiting(self, n):
        with self.waiting_lock:
            self.waiting += n

    def figures(self):
        """The gauges of /metrics this owns."""
        return {"requests_waiting": self.waiting, "kv_cache_bytes": self.kv_bytes}

    def use_kv_for(self, tokens, worth=KV_KEPT, idle=False):
        """Before a prompt of tokens (one of work in idle time with idle): if a kept copy holds
        more of its start than the KV cache does, put that copy back; if the KV cache would lose
        worth tokens or more to it, keep a copy of it first, unless it holds finished work of
        idle time and this is a request's prompt (no prompt would use that copy: the editor did
        not take that completion, or took it and goes on from it). On the model thread."""
        held = self.llm.input_ids[: self.llm.n_tokens].tolist()
        here = common_prefix(held, tokens)
        holds = {k: common_prefix(kept, tokens) for k, (kept, _, _) in self.kv_saved.items()}
        best = max(holds, key=holds.get, default=None)
        mine = self.kv_saved.pop(best) if best is not None and holds[best] > here else None
        worth_it = len(held) - here >= worth and (idle or not self.idle_kv)
        size = llama_cpp.llama_state_seq_get_size(self.llm.ctx, 0) if worth_it and held else 0
        if 0 < size <= self.kv_limit:
            covered = [k for k, (kept, _, _) in self.kv_saved.items() if held[: len(kept)] == kept]
            for key in covered:  # held holds all that those did
                self.kv_free.append(self.kv_saved.pop(key)[1])
            self.kv_saved[next(self.kv_ids)] = save_kv(self.llm, self.kv_buffer(size))
        if mine:
            load_kv(self.llm, mine)
            self.kv_free.append(mine[1])
        while self.kv_bytes > self.kv_limit and self.kv_free:
            self.kv_bytes -= len(self.kv_free.pop())
        self.idle_kv = False  # (finished work of idle time sets it)

    def kv_buffer(self, size):
        """Memory for a KV copy of size bytes: a free buffer that holds it (its pages are in
        already: new memory costs page faults, 2-9 ms a MB where the VM has not touched it),
        else a new one, up to 1/8 larger (to fit the next copies too), room made for it within
        --kv-cache-mb by dropping free buffers, then the least recently used copies."""
        while True:
            fits = [buffer for buffer in self.kv_free if len(buffer) >= size]
            if fits:
                self.kv_free.remove(best := min(fits, key=len))
                return best
            if self.kv_bytes + size <= self.kv_limit or not (self.kv_free or self.kv_saved):
                break
            if self.kv_free:
                self.kv_bytes -= len(self.kv_free.pop())
            else:  # the least recently used copy goes; its buffer may be the one
                self.kv_free.append(self.kv_saved.popitem(last=False)[1][1])
        step = 1 << max(size.bit_length() - 4, 0)
        size = -(-size // step) * step
        self.kv_bytes += size
        return (ctypes.c_uint8 * size)()


# -----------------------------------------------------------------------------------------------
# The completion service: a parsed request in, an Answer out, with what latency needs per client.


LastAnswer = collections.namedtuple("LastAnswer", "language suffix prefix text prompt")


class Job(typing.NamedTuple):
    """A completion request made ready for a backend."""

    prompt: Prompt
    doc: Document
    end_of: typing.Callable  # the text -> where it ends (stop words, the editor's cut), or None
    snippets: list  # in the prompt

    def key(self, language):
        """What a completion depends on, for the completion cache: what the model sees (its
        tokens, or an engine's text), and where its text ends (the language's stop words, the
        cursor that the editor's cut depends on: a prefix-only prompt does not show it)."""
        return language, self.doc.cursor, tuple(self.prompt.tokens or ()) or self.prompt.text


# finish reasons of completions that are not kept: no answer, or one cut short by the time
# budget (a busy moment: asked again, the model may write more)
UNKEPT = ("cancelled", "time")


class Completions:
    """Completions for clients, a client being one (address, user, file): several editors may be
    one client (tabby-agent sends no identity, a team's proxy one address), so a client's state
    only ever saves work. Under a lock it owns the last answers of the last few clients (to type
    through) and the completions kept by prompt (one made ahead flagged until a request uses it).
    Capabilities hook in through context and answered (see __init__)."""

    def __init__(self, backend, config, counters=None):
        self.backend, self.counters = backend, counters or Counters()
        self.max_tokens, self.temperature = config["max_tokens"], config["temperature"]
        self.budget = config["time_budget"] / 1000
        self.room = config["ctx"] - config["max_tokens"]  # for the prompt, in tokens
        self.lock, self.last_answers = threading.Lock(), collections.OrderedDict()
        self.cache, self.cache_size = collections.OrderedDict(), config["completion_cache"]
        self.arrivals = 0  # requests so far: work in idle time stops when a request comes
        # (request, its snippets) -> (more snippets, (a Prompt before it, its snippets) or None)
        self.context = lambda req, snippets: ([], None)
        self.answered = []  # functions (request, Answer, arrivals then) once an answer is sent
        # tokens in a line of text, while the prompt is fitted to the context (see fit): lines
        # far from the cursor stay the same while the user types
        self.line_tokens = functools.lru_cache(maxsize=4096)(backend.count)

    def arrived(self):
        """A request came (the route says so before it reads the body): work in idle time stops
        at once, the CPU is the request's; -> the count, for answered."""
        with self.lock:
            self.arrivals += 1
            return self.arrivals

    def answer(self, req, client, should_stop):
        """The Answer to req, a CompletionRequest, from client. should_stop() says that its HTTP
        client hung up (as tabby-agent does on the next keystroke): the answer is then empty,
        "cancelled", and the model does no more for it. Nothing else cancels a request. An
        earlier answer will do unless the request asks for variety (a temperature, a seed)."""
        seg, reuse = req.segments, req.raw_prompt is None and not req.wants_variety
        if reuse:
            typed = self.typed_through(client, req.language, seg["prefix"], seg["suffix"])
            if typed is not None:
                self.remember(client, req.language, seg["suffix"], seg["prefix"], *typed)
                return Answer(*typed, "typed through")
        job = self.prepare(req, should_stop)
        if job is None:
            return Answer("", "", "cancelled")
        key = job.key(req.language)
        out = self.cached(key) if reuse else None
        if out is None:
            limits = Limits(self.max_tokens, job.end_of, should_stop, self.budget)
            out = self.backend.complete(job.prompt, sampling(req, self.temperature), limits, reuse)
            if reuse and out.reason not in UNKEPT:
                self.keep(key, out)
        text = re.sub(r"(?<!\r)\n", "\r\n", out.text) if job.doc.crlf else out.text
        if text and req.raw_prompt is None:
            self.remember(client, req.language, seg["suffix"], seg["prefix"], text, job.prompt.text)
        reused = job.prompt.size if out.reason in ("cached", "speculated") else out.reused
        return out._replace(text=text, prompt=job.prompt.text, snippets=job.snippets,
                            size=job.prompt.size, reused=reused)  # fmt: skip

    def prepare(self, req, should_stop):
        """The Job of a request (the editor's snippets, then context's; the prompt fitted to
        the context), or None when should_stop() first."""
        if req.raw_prompt is None:
            snippets = pick_snippets(req.segments) if req.retrieval else []
            more, head = self.context(req, snippets) if req.retrieval else ([], None)
            doc = document(req.language, req.segments, self.backend.format.fim, snippets + more)
            make = functools.partial(self.backend.prompt, head=head and head[0])
            prompt, shown = self.fit(doc.prefix, doc.suffix, should_stop, make), doc.snippets
            shown = shown + (head[1] if head else [])
        else:  # a debugging aid: used verbatim, special tokens and all
            doc, shown = Document(req.raw_prompt, "", NO_CURSOR, [], False), []
            raw = lambda text, _: self.backend.raw_prompt(text)  # noqa: E731
            prompt = self.fit(doc.prefix, "", should_stop, raw)
        if prompt is None:
            return None
        stops = stop_words(req.language)
        tail = prompt.text[-max(map(len, stops)) :]  # a stop word may begin in the prompt
        return Job(prompt, doc, lambda text: text_end(text, stops, tail, doc.cursor), shown)

    def cached(self, key):
        """The Answer kept for key, as one made without the model ("cached", or
        "speculated" the first time one made ahead is used), or None."""
        with self.lock:
            kept = self.cache.get(key)
            if kept is None:
                return None
            self.cache[key] = (kept[0], False)
            self.cache.move_to_end(key)
        out, ahead = kept
        if ahead:
            self.counters.add("speculations_total", outcome="used")
        return out._replace(reason="speculated" if ahead else "cached", generated=0, ms=0)

    def keep(self, key, out, ahead=False):
        """Keep out for key, the least recently used going first (one made ahead and never used:
        wasted)."""
        with self.lock:
            self.cache[key] = (out, ahead)
            self.cache.move_to_end(key)
            while len(self.cache) > self.cache_size:
                if self.cache.popitem(last=False)[1][1]:
                    self.counters.add("speculations_total", outcome="wasted")

    def fit(self, prefix, suffix, should_stop, make):
        """make(prefix, suffix), the backend's Prompt, cut to the room the context has for it; or
        None when should_stop() first. Tokenizing is slow (2 µs a character and more), so text far
        from the cursor is never tokenized: lines are counted from the cursor outward until the
        room is full, the cut chosen on those counts (fit_prompt), the prompt made once (rarely
        again, shorter by what the counts missed)."""
        if len(prefix.encode()) + len(suffix.encode()) + 8 <= self.room:  # a token: a byte or more
            return make(prefix, suffix)
        above, below = prefix.splitlines(keepends=True), suffix.splitlines(keepends=True)
        first, last = self.near(reversed(above), should_stop), self.near(below, should_stop)
        if first is None or last is None:
            return None
        first = len(above) - first
        first -= first % PREFIX_STEP  # a line where fit_prompt may cut: the start stays put
        prefix, suffix, overhead = "".join(above[first:]), "".join(below[:last]), make("", "").size

        def count(p, s):
            lines = p.splitlines(keepends=True) + s.splitlines(keepends=True)
            return overhead + sum(map(self.tokens_in, lines))

        budget = self.room
        for _ in range(3):
            prompt = make(*fit_prompt(prefix, suffix, count, budget))
            if should_stop():
                return None
            if prompt.size <= self.room:
                return prompt
            budget -= prompt.size - self.room  # what the counts missed
        exact = lambda p, s: make(p, s).size  # noqa: E731
        return make(*fit_prompt(prefix, suffix, exact, self.room))

    def tokens_in(self, line):
        """About how many tokens a line is; a long one (minified code) is measured by its start."""
        if len(line) <= SAMPLE_CHARS:
            return self.line_tokens(line)
        return self.line_tokens(line[:SAMPLE_CHARS]) * len(line) / SAMPLE_CHARS

    def near(self, lines, should_stop):
        """How many of the lines (nearest the cursor first) it takes to fill the room; None when
        should_stop() first."""
        n, tokens = 0, 0
        for line in lines:
            if tokens > self.room:
                break
            if n % 64 == 0 and should_stop():
                return None
            n, tokens = n + 1, tokens + self.tokens_in(line)
        return n

    def typed_through(self, client, language, prefix, suffix):
        """(the rest of this client's last completion, its prompt) when the client typed the
        start of that completion since, or None."""
        with self.lock:
            last = self.last_answers.get(client)
        if not last or (language, suffix) != last[:2] or not prefix.startswith(last.prefix):
            return None
        typed, text = prefix[len(last.prefix) :], last.text
        if typed and text.startswith(typed) and len(text) > len(typed):
            return text[len(typed) :], last.prompt
        return None

    def remember(self, client, language, suffix, prefix, text, prompt):
        with self.lock:
            self.last_answers[client] = LastAnswer(language, suffix, prefix, text, prompt)
            self.last_answers.move_to_end(client)
            if len(self.last_answers) > LAST_ANSWERS:
                self.last_answers.popitem(last=False)


# -----------------------------------------------------------------------------------------------
# Counters: what the server did, counted where it happens, as Prometheus wants them (since
# start-up) and as anyone else wants to be told (the status page keeps a tally a day).


class Counters:
    """Under one lock, {(name, labels): value} since start-up, anyone's (a capability counts its
    own); and the functions told of each completion and each view or select, as
    tell(ts, kind, completion id, language, user, its Answer or None, ms in all)."""

    def __init__(self):
        self.lock, self.started, self.values = threading.Lock(), time.time(), collections.Counter()
        self.told = []

    def add(self, name, n=1, **labels):
        with self.lock:
            self.values[name, tuple(sorted(labels.items()))] += n

    def tell(self, *about):
        """Tell those in told of a completion answered or cancelled, or of a view or select."""
        for tell in self.told:
            tell(time.time(), *about)


# -----------------------------------------------------------------------------------------------
# The events log: Tabby's layout, so that its analytics read ours.

EVENTS = (*SERVER_EVENTS, "view", "select", "dismiss")  # and tabby-agent's; others: "other"


def without_code(event):
    """An event with no text of anyone's code (--events meta): a completion's prompt and segments
    go, its choices' text becomes sizes. (A capability's events come with their own.)"""
    kind, fields = next(iter(event.items()))
    if kind == "completion":
        choices = [{"index": c["index"], "chars": len(c["text"])} for c in fields["choices"]]
        fields = {k: v for k, v in fields.items() if k not in ("prompt", "segments")}
        return {kind: {**fields, "choices": choices, "snippets": len(fields["snippets"])}}
    return event  # view, select, dismiss, ...: ids and numbers only


def can_make(folder):
    """Whether folder is, or could be made, a folder we can write to (without making it)."""
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)


def append(path, data):
    """data at the end of the file at path (made, with its folder, if missing), with one write();
    a write cut short by a full disk is taken back, so that the file only holds whole lines."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except FileNotFoundError:  # the folder is gone: make it again
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
        except OSError:
            os.ftruncate(fd, size)
            raise
        if written < len(data):
            os.ftruncate(fd, size)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    finally:
        os.close(fd)


class EventsLog:
    """ROOT/events/YYYY-MM-DD.json (a UTC day), a JSON line per event. It owns the folder, what
    is kept (--events, --events-days) and the lock that keeps lines whole. A log that fails (the
    folder gone, the disk full) must not fail the completion it logs: it counts what it lost."""

    def __init__(self, config, logger, counters):
        self.counters = counters
        self.folder = os.path.join(os.path.expanduser(config["root"]), "events")
        self.mode, self.days = config["events"], config["events_days"]
        if self.mode != "off" and not can_make(self.folder):  # made with the first event
            raise SystemExit(f"error: --root: cannot write to {self.folder}")
        self.lock, self.logger = threading.Lock(), logger
        self.failures = set()  # the kinds of failure already logged
        self.today = self.prune(time.time())
        if self.days:  # also when no event comes for days
            threading.Thread(target=self.prune_daily, daemon=True, name="events-days").start()

    def describe(self):
        code = "no code (--events full keeps it)" if self.mode == "meta" else "with the code"
        where = f"{self.folder}: ids, sizes and timings, {code}"
        return f"events: {where if self.mode != 'off' else 'off'}"

    def prune(self, now):
        """Delete the day files older than --events-days; -> today's name, as day files go."""
        today = time.strftime("%Y-%m-%d", time.gmtime(now))
        oldest = time.strftime("%Y-%m-%d", time.gmtime(now - (self.days - 1) * 86400))
        names = os.listdir(self.folder) if self.days and os.path.isdir(self.folder) else []
        for name in names:
            if re.fullmatch(r"\d{4}-\d\d-\d\d\.json", name) and name[:10] < oldest:
                try:
                    os.remove(os.path.join(self.folder, name))
                except OSError as e:
                    self.logger.error("events log: cannot delete %s: %s", name, e.strerror)
        return today

    def prune_daily(self):
        while not time.sleep(86400 - time.time() % 86400 + 1):  # just after midnight, UTC
            with self.lock:
                self.today = self.prune(time.time())

    def write(self, user, event, meta=None):
        """Append one line to today's file, {user, ts, event} (--events meta: meta, the event
        without code, else without_code(event)); -> None, or why it could not."""
        now, kind = time.time(), next(iter(event))
        self.counters.add("events_total", type=kind if kind in EVENTS else "other")
        event = (meta or without_code(event)) if self.mode == "meta" else event
        record = {"user": user, "ts": int(now * 1000), "event": event}
        if self.mode == "off":
            return None
        line = json.dumps(record, ensure_ascii=False)
        # JSON may hold these raw, but readers that split lines on them would break the line
        for separator in ("\x85", "\u2028", "\u2029"):
            line = line.replace(separator, f"\\u{ord(separator):04x}")
        data = (line + "\n").encode()
        path = os.path.join(self.folder, time.strftime("%Y-%m-%d", time.gmtime(now)) + ".json")
        with self.lock:
            if not path.endswith(self.today + ".json"):  # a new day: the oldest one goes
                self.today = self.prune(now)
            try:
                append(path, data)
                self.failures.clear()  # it works again: a new failure is worth saying
                return None
            except OSError as e:
                self.counters.add("events_lost_total")
                why = e.strerror or type(e).__name__
                if why not in self.failures:  # once per kind, not per request
                    self.failures.add(why)
                    self.logger.error("events log: cannot write %s: %s (events are lost until "
                                      "it can; this is said once)", path, why)  # fmt: skip
                return why


def completion_event(completion_id, req, answer, user_agent, ms):
    """What the log keeps of a served completion: Tabby's record, and how it was made (the
    snippets in its prompt, the editor's and the repository's; tokens, finish reason, ms in the
    model and in all)."""
    segments = {k: v for k, v in req.segments.items() if v is not None}
    return {"completion": {
        "completion_id": completion_id, "language": req.language, "prompt": answer.prompt,
        "segments": segments, "choices": [{"index": 0, "text": answer.text}],
        "user_agent": user_agent, "snippets": answer.snippets, "prompt_tokens": answer.size,
        "reused_tokens": answer.reused, "generated_tokens": answer.generated,
        "finish_reason": answer.reason, "model_ms": round(answer.ms, 1), "total_ms": round(ms, 1),
    }}  # fmt: skip


# -----------------------------------------------------------------------------------------------
# Routes: the core's parts, made into a Server by create_app() (at the end of the file); each
# route parses, asks one of them, and answers. Errors have one shape: {"error": "..."}.


@dataclasses.dataclass
class Server:
    """The core's parts, for the capabilities to attach to."""

    config: dict
    app: Flask
    counters: Counters
    events: EventsLog
    # token -> the user it names (None: --token's, nobody), or None: open to all; replaced
    # whole, never changed (a capability adds tokens of its own)
    tokens: dict | None
    # a --model (or --chat-model) value -> its file (a capability may fetch it)
    locate: typing.Callable = lambda value, flag: value
    backend: typing.Any = None  # LocalModel, unless a capability set another
    completions: Completions | None = None
    health: list = dataclasses.field(default_factory=list)  # functions -> more for /v1/health
    about: list = dataclasses.field(default_factory=list)  # -> [(label, text, ok)], for people
    guarded: list = dataclasses.field(default_factory=list)  # more paths that need the token


def body_of(request):
    """The bytes of a request's body. A chunked body (no Content-Length) over --max-body is cut
    at the limit by Werkzeug without a word; reading on past it raises the 413 it should."""
    data = request.get_data()
    if request.content_length is None and len(data) >= (request.max_content_length or math.inf):
        request.stream.read(1)
    return data


class ClientGone:
    """A request's should_stop(): whether its HTTP client hung up, as tabby-agent does on every
    keystroke. Werkzeug's server (python app.py, flask run) exposes the socket; elsewhere this
    cannot tell, and says no."""

    def __init__(self, environ):
        self.sock = environ.get("werkzeug.socket")

    def __call__(self):
        try:  # closed: its end is all there is to read (the plain socket's recv: an SSL socket's
            # refuses to peek; flask run --cert serves those)
            peek = lambda: socket.socket.recv(self.sock, 1, socket.MSG_PEEK)  # noqa: E731
            return self.sock is not None and self.stirs(0) and peek() == b""
        except (OSError, ValueError):
            return True

    def stirs(self, timeout):
        """Whether the client's socket has something to read (data, or its end) within timeout
        seconds (no socket: False, after 10 ms); OSError or ValueError when it is closed. poll():
        select() refuses file descriptors past 1023, which a busy server has."""
        if self.sock is None:
            return time.sleep(0.01) or False
        if not hasattr(select, "poll"):  # Windows, whose select() has no such limit
            return bool(select.select([self.sock], [], [], timeout)[0])
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(timeout * 1000))


def system_info(backend):
    """The static part of /v1/health: what runs this server."""
    cpu_info = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:  # Linux: the CPU's name
        names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        cpu_info = next(names, cpu_info)
    version = dict.fromkeys(("build_date", "build_timestamp", "git_sha"), "")
    return {"model": backend.name, "device": backend.device, "arch": platform.machine(),
            "cpu_info": cpu_info, "cpu_count": os.cpu_count(), "cuda_devices": [],
            "version": {**version, "git_describe": TABBY_VERSION}}  # fmt: skip


def open_server(config):
    """The Server of a config (from the environment when None), before any model: the Flask app
    with its token check and error handlers, the counters and the events log."""
    if config is None:
        try:
            config = load_config(environ=os.environ)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    check_config(config)
    app = Flask(__name__)
    app.logger.setLevel(logging.INFO)  # one line per completion
    app.config["MAX_CONTENT_LENGTH"] = config["max_body"]
    app.json.ensure_ascii = False
    counters = Counters()
    events = EventsLog(config, app.logger, counters)  # no files made yet
    tokens = {config["token"]: None} if config["token"] else None
    app.extensions["tabbypy"] = server = Server(config, app, counters, events, tokens)

    @app.before_request
    def check_token():
        """The token check, which names the request's user (g.user: a user a token names)."""
        g.user, tokens, path = None, server.tokens, request.path
        if tokens is None or not (path.startswith(("/v1/", "/v1beta/")) or path in server.guarded):
            return None
        auth = request.authorization  # Bearer TOKEN, or a browser's Basic with it as password
        given = (auth.password if auth.type == "basic" else auth.token) or "" if auth else ""
        for token, user in tokens.items():
            if hmac.compare_digest(given.encode(), token.encode()):
                g.user = user
                return None
        abort(401, "missing or wrong token: send Authorization: Bearer <token>")

    @app.errorhandler(HTTPException)
    def http_error(e):
        return jsonify(error=e.description), e.code

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(e):
        return jsonify(error=f"the body is over this server's {config['max_body']} bytes "
                             "(--max-body)"), 413  # fmt: skip

    @app.errorhandler(Exception)
    def server_error(e):
        app.logger.exception("unexpected error on %s", request.path)
        return jsonify(error=f"internal error: {type(e).__name__}"), 500

    return server


def serve_completions(server):
    """The core's backend (a local model, unless a capability set another), the completion
    service, and Tabby's routes."""
    config, app, events, counters = server.config, server.app, server.events, server.counters
    if server.backend is None:
        if not config["model"]:
            raise SystemExit(f"error: no model: pass --model PATH.gguf or set {ENV_PREFIX}MODEL")
        server.backend = LocalModel(config, server.locate(config["model"], "--model"))
    server.health.append(server.backend.health)
    for line in [*server.backend.describe(), events.describe()]:
        print(line, file=sys.stderr)
    if server.tokens is None and config["host"] not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {config['host']} without a token: anyone who can reach it "
              f"can use it (set --token or {ENV_PREFIX}TOKEN)", file=sys.stderr)  # fmt: skip
    server.completions = completions = Completions(server.backend, config, counters)
    health = system_info(server.backend)

    @app.route("/v1/health", methods=["GET", "POST"])
    def health_route():
        return jsonify(functools.reduce(lambda a, part: {**a, **part()}, server.health, health))

    @app.get("/v1beta/server_setting")
    def server_setting():
        return jsonify(disable_client_side_telemetry=not config["client_telemetry"])

    @app.post("/v1/events")
    def events_route():
        body = json_body(body_of(request))
        event = parse_event(body, request.args.get("select_kind"))
        ((kind, fields),) = event.items()
        if kind in ("view", "select"):
            counters.tell(kind, fields["completion_id"], None, g.user, None, 0)
        why = events.write(g.user or get(body, "user", str), event)
        if why:
            abort(503, f"the event was not stored: {why}")
        return "", 200

    @app.post("/v1/completions")
    def completions_route():
        started, arrivals = time.perf_counter(), completions.arrived()
        req = parse_completion(json_body(body_of(request)))
        req.user = g.user or req.user
        client = (request.remote_addr, req.user, req.segments.get("filepath"))
        answer = completions.answer(req, client, ClientGone(request.environ))
        completion_id, ms = f"cmpl-{uuid.uuid4()}", round((time.perf_counter() - started) * 1e3, 1)
        answer = answer._replace(ms=round(answer.ms, 1))  # counted as logged, so a restart agrees
        language = req.language if req.language in (*LANGUAGE, "unknown") else "other"
        served = answer if answer.reason != "cancelled" else None
        counters.tell("completion", completion_id, language, g.user, served, ms)
        if served:
            user_agent = request.headers.get("User-Agent")
            events.write(req.user, completion_event(completion_id, req, answer, user_agent, ms))
        else:  # a count, for the status page and /metrics: nothing was shown
            cancelled = {"completion_id": completion_id, "language": req.language, "total_ms": ms}
            events.write(req.user, {"completion_cancelled": cancelled})
        app.logger.info("%s: %d prompt tokens (%d reused), %d generated, %s; %.1f ms in the "
                        "model, %.1f ms in all", completion_id, answer.size, answer.reused,
                        answer.generated, answer.reason, answer.ms, ms)  # fmt: skip
        body = {"id": completion_id, "choices": [{"index": 0, "text": answer.text}]}
        if req.debug_data:  # debug_options was sent
            body["debug_data"] = {"snippets": answer.snippets} if req.return_snippets else {}
            body["debug_data"].update({"prompt": answer.prompt} if req.return_prompt else {})
        response = jsonify(body)
        for then in completions.answered:  # once the answer is sent: till then the CPU is its
            response.call_on_close(functools.partial(then, req, answer, arrivals))
        return response


# Capabilities beyond the core
# ===============================================================================================
# Each section below attaches itself with one line in create_app() (the last function), through
# what the core offers anyone: the backend, the completion service's two hooks (context: more for
# a prompt; answered: what to do once an answer is sent), the Flask app, the counters (and their
# told list) and the Server record's lists (health, about, guarded). The core names nothing a
# section defines. To delete a capability, delete its section (from its comment rule to the
# next; its knobs are in it, in a CONFIG.update) and its line in create_app():
# tests/test_capabilities.py does exactly that for each one and runs the core tests on the rest.
#
# The moving parts, each because:
# - threads (6 kinds): the model's one thread (a Llama is not thread-safe, and llama.cpp's OpenMP
#   workers belong to their caller); an engine request's hang-up watch (the engine must stop the
#   moment the editor moves on); --events-days pruning at midnight; the repository index's
#   refresh; the --tokens file watch (revoking without a restart); a name lookup with a time
#   limit at start-up (the Hugging Face download: a lookup cannot be given one);
# - locks (8): the completion service's (last answers, completion cache), the counters', the
#   events log's (whole lines), the model queue's waiting count, an engine's waiting count, one
#   chat at a time, the index's reading connection, the status page's tallies;
# - caches (7): the completion cache (--completion-cache), the last answers (typed through), the
#   KV copies (--kv-cache-mb), tokens of the prompt's pieces (64) and of lines (4,096: fitting a
#   prompt tokenizes only near the cursor), BM25 results for the text above the cursor (64), and
#   each model file's test load (once a process);
# - knobs: 33, 20 of them the core's; python app.py --help lists them.
#
# Where a change goes: a new reason to stop generating is a check in generate(); a new kind of
# engine is an entry in ENGINES plus its request (engine_body) and stream (engine_event); a new
# language is an entry in LANGUAGES; a new capability is a section with an add_...(server) and its
# line in create_app().

# -----------------------------------------------------------------------------------------------
# Remote engines (--backend): the prompt is built here, an inference engine generates, streaming
# back pieces of text that feed the same generate() loop as a local model's tokens.

# fmt: off
CONFIG.update({
    "backend": ("", "URL of an inference engine to generate with instead of --model: llama-server "
                    "(.../completion), an OpenAI-style server such as vLLM (.../v1) or Ollama "
                    "(.../api/generate)"),
    "backend_kind": ("", "llama.cpp, openai or ollama; empty: told by the --backend URL's path"),
    "backend_model": ("", "model name sent to the engine, and which picks the FIM template; "
                          "empty: the engine's first (llama.cpp, openai)"),
    "backend_token": ("", "bearer token sent to the engine"),
    "backend_timeout": (10.0, "seconds to wait for the engine to connect or send its next piece; "
                              "then 504"),
})
# fmt: on

# kind: (its completion endpoint, a cheap GET that shows it answers), under the engine's base URL
ENGINES = {
    "llama.cpp": ("/completion", "/health"),  # llama-server
    "openai": ("/v1/completions", "/v1/models"),  # vLLM, llama-cpp-python's server, LM Studio, ...
    "ollama": ("/api/generate", "/api/version"),
}
CHAT_PATH = "/v1/chat/completions"  # every kind serves OpenAI's chat API (Ollama's, llama-server's)
BYTES_PER_TOKEN = 3  # no tokenizer here: prompts are fitted to --ctx counting 3 bytes a token
RETRIES = 3  # tries to reach an engine that refuses connections or answers 503 (loading, busy)
# Text shaped like a special token. An engine tokenizes a text prompt with special tokens parsed,
# so user code must not carry such text there as it is: a zero-width space goes after its first
# character. (A local model gets the text as text; see tokenize_text.)
SPECIAL_LOOKING = (
    r"<\|[^|<>\s]+\|>|<｜[^｜<>\s]+｜>|</?s>|<(?:fim[_-]\w+|file_sep|repo_name|PRE|SUF|MID|EOT)>"
    r"|\[(?:PREFIX|SUFFIX|MIDDLE)\]"
)


def engine_of(config):
    """(kind, the URL split, the base URL where ENGINES' paths go) that --backend names: the
    kind is --backend-kind, else told by the URL's path. SystemExit when it says too little."""
    backend, url = config["backend"], urllib.parse.urlsplit(config["backend"])
    try:
        if url.scheme not in ("http", "https") or not url.hostname or url.port == 0:
            raise ValueError
    except ValueError:  # url.port raises it too, for a port that is not a number
        raise SystemExit(f"error: --backend {backend!r}: not an http:// or https:// URL") from None
    path = url.path.rstrip("/")
    told = next((k for k, (endpoint, _) in ENGINES.items() if path.endswith(endpoint)), "")
    kind = config["backend_kind"] or ("openai" if path.endswith("/v1") else told)
    if kind not in ENGINES and kind:
        raise SystemExit(f"error: --backend-kind must be one of {', '.join(ENGINES)}, not {kind!r}")
    if kind not in ENGINES:
        raise SystemExit(f"error: --backend {backend}: which engine is it? End the URL with "
                         "/completion (llama-server), /v1 (OpenAI-style: vLLM, ...) or "
                         "/api/generate (Ollama), or pass --backend-kind")  # fmt: skip
    tail = next((t for t in (ENGINES[kind][0], "/v1") if path.endswith(t)), "")
    path = path[: len(path) - len(tail)]
    return kind, url._replace(path=path), f"{url.scheme}://{url.netloc}{path}"


def engine_format(model, override):
    """(PromptFormat, defang) for an engine's model: --prompt-template, else the template known
    for its name. The markers stay text (the engine makes them tokens), so defang(text) keeps
    user text from looking like them."""
    name = model.lower()
    template = override or next(
        (t for t, names in FIM_TEMPLATES.items() if any(n in name for n in names)), None
    )
    if template is None:
        raise SystemExit(
            f"error: no FIM template is known for the model {model!r}: pass --prompt-template "
            "(e.g. '<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>', or '{prefix}' for "
            "prefix-only)"
        )
    markers = re.findall(MARKER, template)
    special = re.compile("|".join([SPECIAL_LOOKING] + [re.escape(m) for m in markers]))
    defang = lambda text: special.sub(lambda m: m[0][0] + "\u200b" + m[0][1:], text)  # noqa: E731
    return template_format(template, {m: m for m in markers}), defang


def engine_body(kind, model, prompt, max_tokens, sampling):
    """An engine's streaming completion request for a prompt, already templated. No stop words:
    an engine holds back text that may begin one ("\\n" begins them all) until the next token,
    which would make every answer that ends at a line end a token late. We stop it ourselves."""
    temperature, seed = sampling
    if kind == "ollama":
        options = {"num_predict": max_tokens, "temperature": temperature, "seed": seed}
        options["repeat_penalty"] = 1.0
        return {"model": model, "prompt": prompt, "raw": True, "stream": True, "options": options}
    body = {"prompt": prompt, "temperature": temperature, "seed": seed, "stream": True}
    if kind == "llama.cpp":
        return {**body, "n_predict": max_tokens, "cache_prompt": True, "repeat_penalty": 1.0}
    return {**body, "max_tokens": max_tokens, **({"model": model} if model else {})}


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


def engine_event(kind, line):
    """(text, finished) of one line of an engine's stream: SSE "data: {json}" lines (llama.cpp,
    openai, chat) or JSON lines (Ollama); (None, False) for the lines between events; 502 for
    others."""
    line, sse = line.decode("utf-8", "replace").strip(), kind != "ollama"
    if not line or (sse and line.startswith((":", "event:", "id:", "retry:"))):
        return None, False
    if sse and line == "data: [DONE]":
        return None, True
    try:
        event = json.loads(line[5:] if sse and line.startswith("data:") else line)
        if "error" in event:
            abort(502, f"engine error: {str(event['error'])[:200]}")
        if kind == "llama.cpp":
            text, finished = event["content"], event.get("stop")
        elif kind == "ollama":
            text, finished = event["response"], event.get("done")
        elif not event["choices"]:  # a usage-only chunk
            return None, False
        else:
            choice = event["choices"][0]
            text = choice["text"] if kind == "openai" else choice["delta"].get("content") or ""
            finished = choice.get("finish_reason")
        if not isinstance(text, str):
            raise TypeError
        return text, bool(finished)
    except (ValueError, LookupError, TypeError, AttributeError):
        abort(502, f"engine sent something that is not a {kind} stream: {line[:100]!r}")


def hang_up(sock):
    """The engine sees the end now, whoever else holds the socket: the plain socket's shutdown,
    since an SSL socket's own would unwrap it under its reader."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def watch(sock, should_stop):
    """Check should_stop() also while we wait for the engine (a long prompt, a queue), and hang
    up sock the moment it says so; -> the Event that ends the watch. A ClientGone is asked when
    its client's socket stirs (or every 0.1 s), anything else every 10 ms: a thread that wakes
    a hundred times a second takes a core from an engine on the same machine (bench/README)."""
    done, stirs = threading.Event(), getattr(should_stop, "stirs", None)

    def run(stirs):
        while not done.is_set():
            try:
                stirred = stirs(0.1) if stirs else time.sleep(0.01)
            except (OSError, ValueError):  # closed: should_stop() says so
                stirred = True
            if should_stop():
                return hang_up(sock)
            if stirred:  # data, not its end (a pipelined request): poll from now on
                stirs = None

    threading.Thread(target=run, args=(stirs,), daemon=True).start()
    return done


class Engine:
    """An HTTP inference engine that generates for us: a backend (see LocalModel). It owns where
    it is (its URL and kind), what we send it (model name, token) and how long we wait."""

    def __init__(self, config, counters):
        self.kind, self.url, self.base = engine_of(config)
        self.model, self.counters = config["backend_model"], counters
        token = config["backend_token"]
        self.headers = {"Content-Type": "application/json"}
        self.headers.update({"Authorization": f"Bearer {token}"} if token else {})
        self.timeout, self.ctx = config["backend_timeout"], config["ctx"]
        if self.kind == "ollama" and not self.model:
            raise SystemExit("error: --backend-model is needed for Ollama (the model's name, "
                             "e.g. qwen2.5-coder:1.5b-base)")  # fmt: skip
        override = config["prompt_template"]
        if not self.model and not override:
            try:  # the first model the engine lists
                self.model = self.get("/v1/models", self.timeout)["data"][0]["id"]
            except (OSError, http.client.HTTPException, ValueError, LookupError, TypeError) as e:
                raise SystemExit(f"error: --backend {self.base}: cannot ask it which model it "
                                 f"serves ({e or type(e).__name__}); pass --backend-model NAME "
                                 "or --prompt-template") from None  # fmt: skip
        self.format, self.defang = engine_format(self.model, override)
        self.source = "--prompt-template" if override else "known for this model name"
        self.name, self.device = self.model or "Remote", "remote"  # Tabby's name for no name
        self.chat_model = None  # the name sent for a chat ("": none), once there is chat
        self.waiting, self.lock = 0, threading.Lock()  # requests the engine has not begun

    def describe(self):
        how = f"FIM template {self.format.template!r}" if self.format.fim else "prefix-only prompts"
        return [f"engine {self.kind} at {self.base}, model {self.name}: {how} ({self.source}); "
                f"prompts up to ctx {self.ctx} tokens, counted as {BYTES_PER_TOKEN} bytes "
                "each"]  # fmt: skip

    def health(self):
        """Whether the engine answers now, asked in 2 s at most."""
        try:
            self.get(ENGINES[self.kind][1], min(2, self.timeout))
            error = None
        except (OSError, http.client.HTTPException, ValueError) as e:
            error = f"{e or type(e).__name__}"
        backend = {"kind": self.kind, "url": self.base, "answers": error is None}
        return {"backend": {**backend, **({"error": error} if error else {})}}

    def prompt(self, prefix, suffix, head=None):
        """The prompt as text, its user code kept from looking like special tokens, its size
        guessed. (No head: an engine's model has no repository-level tokens that we know.)"""
        return self.raw_prompt(arrange(self.format, self.defang(prefix), self.defang(suffix))[1])

    def raw_prompt(self, text):
        return Prompt(None, text, len(text.encode()) // BYTES_PER_TOKEN)

    def count(self, text):
        return len(text.encode()) / BYTES_PER_TOKEN

    def complete(self, prompt, sampling, limits, reuse=False):
        """The Answer to prompt, on this thread: the engine serves several at once (or queues).
        (reuse: nothing is kept here to reuse.)"""
        t = time.perf_counter()
        body = engine_body(self.kind, self.model, prompt.text, limits.max_tokens, sampling)
        pieces = self.stream(ENGINES[self.kind][0], self.kind, body, limits.should_stop)
        text, n, reason = finish(generate(pieces, *limits))
        return Answer(text, reason=reason, generated=n, ms=(time.perf_counter() - t) * 1000)

    def chat(self, req, sampling, should_stop):
        """(generate() steps of the engine's answer to a ChatRequest, 0: its prompt's size is
        not known here)."""
        body = {"messages": req.messages, "temperature": sampling.temperature,
                "seed": sampling.seed, "stream": True}  # fmt: skip
        body.update({"model": self.chat_model} if self.chat_model else {})
        body.update({"max_tokens": req.max_tokens} if req.max_tokens else {})
        pieces = self.stream(CHAT_PATH, "chat", body, should_stop)
        end_of = lambda text: find_stop(text, req.stop)  # noqa: E731
        return generate(pieces, req.max_tokens or math.inf, end_of, should_stop), 0

    def figures(self):
        """The gauges of /metrics this owns: requests the engine has not begun to answer."""
        return {"requests_waiting": self.waiting}

    def record(self, waiting=0, error=None):
        with self.lock:
            self.waiting += waiting
        if error:  # the status we answered
            self.counters.add("engine_errors_total", status=str(error))

    def connect(self, timeout):
        https = self.url.scheme == "https"
        connection = http.client.HTTPSConnection if https else http.client.HTTPConnection
        return connection(self.url.hostname, self.url.port, timeout=timeout)

    def get(self, path, timeout):
        """The JSON the engine answers a GET of path with; OSError, HTTPException or ValueError
        if it does not."""
        conn = self.connect(timeout)
        try:
            conn.request("GET", self.url.path + path, headers=self.headers)
            response = conn.getresponse()
            body = response.read(1 << 20)
            if response.status != 200:
                raise ValueError(f"it answered {response.status}")
            return json.loads(body)
        finally:
            conn.close()

    def stream(self, path, kind, body, should_stop):
        """The pieces of text the engine streams for a POST of body to path (kind: how to read
        them). The request is made here, so that an engine that fails at once gets its 502 or
        504 before anything is answered: refused connections and 503s (down, loading, busy) are
        tried RETRIES times, 0.1 s then 0.2 s apart; any other failure gets a 502 at once, no
        answer a 504. Closing the pieces, or should_stop() (see watch), drops the connection at
        once: the engine stops generating and frees its slot."""
        self.record(waiting=1)  # until the engine begins to answer
        try:
            for attempt in range(RETRIES):
                time.sleep(0.1 * 2 ** (attempt - 1) if attempt else 0)
                conn, watching = self.connect(self.timeout), threading.Event()
                try:
                    conn.request("POST", self.url.path + path, json.dumps(body), self.headers)
                    sock = conn.sock
                    watching = watch(sock, should_stop)
                    response = conn.getresponse()
                    if response.status == 200:
                        return self.read(kind, sock, response, watching, should_stop)
                    status, error = response.status, f"answered {engine_error(response)}"
                except TimeoutError:
                    status, error = 504, f"did not answer within {self.timeout:g} s"
                except ConnectionError as e:
                    status, error = 503, f"cannot reach it: {e.strerror or type(e).__name__}"
                except (OSError, http.client.HTTPException) as e:
                    status, error = 502, f"{e or type(e).__name__}"
                conn.close()
                watching.set()
                if should_stop():
                    return iter(())
                if status != 503:
                    break
        finally:
            self.record(waiting=-1)
        self.record(error=504 if status == 504 else 502)
        abort(504 if status == 504 else 502, f"engine at {self.base}: {error}")

    def read(self, kind, sock, response, watching, should_stop):
        try:
            while True:
                line = response.readline(1 << 20)
                if not line:
                    if should_stop():
                        return
                    abort(502, f"engine at {self.base} ended its stream before it finished")
                text, finished = engine_event(kind, line)
                if text:
                    yield text
                if finished:
                    return
        except HTTPException as e:  # engine_event's, and those above
            self.record(error=e.code)
            raise
        except TimeoutError:
            self.record(error=504)
            abort(504, f"engine at {self.base} sent nothing for {self.timeout:g} s")
        except (OSError, ValueError, http.client.HTTPException) as e:
            if should_stop():
                return
            self.record(error=502)
            abort(502, f"engine at {self.base}: the stream broke off ({e or type(e).__name__})")
        finally:
            watching.set()
            hang_up(sock)
            response.close()
            sock.close()


def add_engine(server):
    """With --backend, an Engine is the backend (the knobs of a local model make no sense)."""
    config = server.config
    if not config["backend"]:
        return
    if config["model"]:
        raise SystemExit("error: --model and --backend both given: pass one (--backend "
                         "generates with the engine's model)")  # fmt: skip
    local = {"--device": config["device"] != "cpu", "--threads": config["threads"],
             "--flash-attn": config["flash_attn"] != "auto",
             "--repack": config["repack"] != "auto"}  # fmt: skip
    given = [flag for flag, value in local.items() if value]
    if given:
        raise SystemExit(f"error: {', '.join(given)}: for a local model; with --backend the "
                         "engine decides")  # fmt: skip
    if not config["backend_timeout"] > 0:
        raise SystemExit("error: --backend-timeout must be more than 0 seconds")
    server.backend = engine = Engine(config, server.counters)

    def about():
        said = engine.health()["backend"]
        answers = "answers" if said["answers"] else f"does not answer: {said.get('error')}"
        return [("Engine", f"{engine.base} {answers}", said["answers"])]

    server.about.append(about)


# -----------------------------------------------------------------------------------------------
# Chat (--chat-model): OpenAI's /v1/chat/completions, which Tabby's extensions use for inline
# edits, explanations and commit messages; from a chat model here, or from the engine's.

# fmt: off
CONFIG.update({
    "chat_model": ("", "instruct model for /v1/chat/completions: GGUF file (or repo id), or "
                       "'same' (--model, if it has a chat template); with --backend, the "
                       "engine's model name ('same': --backend-model). Empty: no chat"),
    "chat_template": ("", "Jinja2 chat template, for a chat model without one in its GGUF "
                          "metadata"),
})
# fmt: on


@dataclasses.dataclass
class ChatRequest:
    """A /v1/chat/completions body (OpenAI's shape), checked."""

    messages: list  # [{role, content}], content as one string
    stop: list  # strings
    stream: bool
    user: str | None = None
    temperature: float | None = None
    seed: int | None = None
    max_tokens: int | None = None  # None: up to the end of the context (or the engine's limit)


def parse_message(message, where):
    """One chat message as {role, content}; content parts (text only) are joined."""
    if not isinstance(message, dict):
        abort(400, f"{where} must be an object")
    content = message.get("content")
    if isinstance(content, list):  # parts: only text can be read here
        text = lambda part: isinstance(part, dict) and part.get("type") == "text"  # noqa: E731
        if not all(text(part) and isinstance(part.get("text"), str) for part in content):
            abort(400, f'{where}.content parts must all be {{"type": "text", "text": ...}}')
        message = dict(message, content="".join(part["text"] for part in content))
    return {"role": get(message, "role", str, where + ".", True),
            "content": get(message, "content", str, where + ".") or ""}  # fmt: skip


def parse_chat(body, stream=False):
    """A /v1/chat/completions body as a ChatRequest; stream is the default for "stream"
    (OpenAI's is false; Tabby's older clients stream without asking)."""
    messages = get(body, "messages", list, required=True)
    if not messages:
        abort(400, "messages must not be empty")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        abort(400, "stop must be a string or a list of non-empty strings")
    asked, max_tokens = get(body, "stream", bool), get(body, "max_tokens", int)
    req = ChatRequest(
        [parse_message(message, f"messages[{i}]") for i, message in enumerate(messages)],
        [clean(s) for s in stop],
        stream if asked is None else asked,
        get(body, "user", str),
        get(body, "temperature", float),
        get(body, "seed", int),
        get(body, "max_completion_tokens", int) if max_tokens is None else max_tokens,
    )
    get(body, "model", str)  # checked, not used: there is one chat model
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        abort(400, "temperature must be between 0 and 2")
    if req.max_tokens is not None and req.max_tokens < 1:
        abort(400, "max_tokens must be at least 1")
    if req.seed is not None and req.seed < 0:
        abort(400, "seed must be 0 or more")
    return req


def chat_formatter(llm, override, flag):
    """llama-cpp-python's Jinja2 formatter for the chat model's template: --chat-template, else
    the one in its GGUF metadata; SystemExit without either."""
    template = override or llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise SystemExit(f"error: {flag}: the model has no chat template in its metadata: pass "
                         "--chat-template (a Jinja2 template), or another model")  # fmt: skip
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eos, bos = (llama_cpp.llama_vocab_get_text(vocab, t).decode(errors="replace") if t >= 0 else ""
                for t in (llm.token_eos(), llm.token_bos()))  # fmt: skip
    try:
        return llama_cpp.llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=eos, bos_token=bos, stop_token_ids=[llm.token_eos()]
        )
    except Exception as e:  # jinja2's TemplateSyntaxError and kin
        raise SystemExit(f"error: --chat-template: not a Jinja2 template: {e}") from None


def chat_prompt(llm, formatter, messages):
    """(prompt, tokens) of messages through the chat template. The template's own text is
    tokenized with special tokens parsed and the messages' text as plain text, so that no message
    can end its turn or start another. Where the messages' text is in the prompt shows in a second
    rendering with a placeholder for each (put back as written, or stripped as templates often
    do)."""
    prompt = formatter(messages=messages).prompt
    # private-use characters around each message's number
    placeholders = [dict(m, content=f"\ue000{i}\ue001") for i, m in enumerate(messages)]
    # template text, message number, template text, ...
    parts = re.split("\ue000(\\d+)\ue001", formatter(messages=placeholders).prompt)
    special = lambda text: llm.tokenize(text.encode(), add_bos=False, special=True)  # noqa: E731
    plain = lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)  # noqa: E731
    template = "".join(parts[::2])
    protected = set(special(template)) - set(plain(template))
    for texts in ([m["content"] for m in messages], [m["content"].strip() for m in messages]):
        if "".join(texts[int(p)] if i % 2 else p for i, p in enumerate(parts)) != prompt:
            continue
        tokens = []
        for i, part in enumerate(parts):
            tokens += tokenize_text(llm, texts[int(part)], protected) if i % 2 else special(part)
        return prompt, tokens
    if any(special(m["content"]) != plain(m["content"]) for m in messages):
        changed = "the chat template changes the messages' text"
        abort(422, f"{changed}, so special tokens spelled in it could not be kept as text")
    return prompt, special(prompt)


EVAL_CHUNK = 64  # prompt tokens a chat evaluates at a time, letting completions go between


class LocalChat:
    """A chat model in this process (--chat-model: a GGUF file; 'same': the completion model's
    file once more, in a context of its own, its weights memory-mapped, so shared on a CPU),
    run on the completion model's thread a step at a time (a chunk of the prompt, a token):
    completions that come meanwhile go first, waiting one step at most. One chat at a time."""

    def __init__(self, server):
        config, model = server.config, server.backend
        name = config["chat_model"]
        path = model.llm.model_path if name == "same" else server.locate(name, "--chat-model")
        self.llm = load_model(config, path, "--chat-model")
        self.format = chat_formatter(self.llm, config["chat_template"], "--chat-model " + name)
        self.name = os.path.basename(path) if os.path.exists(name) or name == "same" else name
        self.model, self.completions, self.ctx = model, server.completions, config["ctx"]
        self.lock = threading.Lock()  # one chat at a time

    def chat(self, req, sampling, should_stop):
        """(generate() steps of the answer to req, its prompt's size)."""
        try:
            _, tokens = chat_prompt(self.llm, self.format, req.messages)
        except HTTPException:
            raise
        except Exception as e:  # the template's raise_exception (roles must alternate, ...)
            abort(422, f"the chat template cannot render these messages: {e}")
        room = self.ctx - len(tokens)
        if room < 1:
            context = f"the chat model's context holds {self.ctx} (--ctx)"
            abort(400, f"the messages take {len(tokens)} tokens; {context}")

        def pieces():  # each step a job on the model thread
            keep_kv(self.llm, tokens)
            for i in range(self.llm.n_tokens, len(tokens), EVAL_CHUNK):
                self.llm.eval(tokens[i : i + EVAL_CHUNK])
                yield b""  # (generate() skips it)
            yield from model_pieces(self.llm, tokens, *sampling)

        end_of = lambda text: find_stop(text, req.stop)  # noqa: E731
        steps = self.stepwise(pieces(), should_stop)
        return generate(steps, min(req.max_tokens or room, room), end_of, should_stop), len(tokens)

    def stepwise(self, pieces, should_stop):
        """The chat model's pieces, each computed on the model thread as a job of its own (a
        request, as work in idle time sees it)."""
        while not self.lock.acquire(timeout=0.05):
            if should_stop():
                return
        try:
            while True:
                self.completions.arrived()
                piece = self.model.on_thread(should_stop, next, pieces, None)
                if piece is None:
                    return
                yield piece
        finally:
            self.model.thread.submit(pieces.close)  # on the model thread too, before the next's
            self.lock.release()


def held_back(text, stops):
    """How much of text can be streamed: all but an end that may begin a stop word."""
    for n in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1):
        if any(stop.startswith(text[-n:]) for stop in stops):
            return len(text) - n
    return len(text)


def chat_stream(steps, stops, chunk, done, logger):
    """A chat answer as Server-Sent Events (chunk(delta, finish reason) each), as Tabby sends
    them: every event is JSON (no "data: [DONE]"); the role first, then the text as it comes
    (but an end that may begin a stop word), then the finish reason that done(text, n, reason)
    gives. An error half way goes in an event of its own."""
    sent = 0
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                text, end = next(steps), None
            except StopIteration as stop:
                text, end = stop.value[0], stop.value
            upto = len(text) if end else held_back(text, stops)
            if upto > sent:
                yield chunk({"content": text[sent:upto]})
                sent = upto
            if end:
                yield chunk({}, done(*end))
                return
    except HTTPException as e:  # the headers are gone: the error goes in the stream
        yield "data: " + json.dumps({"error": {"message": e.description, "code": e.code}}) + "\n\n"
    except Exception as e:
        logger.exception("unexpected error in a chat stream")
        error = {"message": f"internal error: {type(e).__name__}", "code": 500}
        yield "data: " + json.dumps({"error": error}) + "\n\n"
    finally:
        steps.close()  # the client left: stop generating


def add_chat(server):
    """/v1/chat/completions (and Tabby 0.7-0.10's /v1beta path): 501 without --chat-model."""
    config, backend, app = server.config, server.backend, server.app
    name, local, chat, chat_name = config["chat_model"], isinstance(backend, LocalModel), None, None
    if config["chat_template"] and not local:
        raise SystemExit("error: --chat-template: for a local model; with --backend the engine "
                         "decides")  # fmt: skip
    if name and not local:  # the engine's chat
        chat, backend.chat_model = backend, backend.model if name == "same" else name
        chat_name = backend.chat_model or "Remote"
        print(f"chat model {chat_name} (the engine's)", file=sys.stderr)
    elif name:
        chat = LocalChat(server)
        chat_name, given = chat.name, config["chat_template"]
        source = "--chat-template" if given else "the chat template in its metadata"
        print(f"chat model {chat_name}: {source}", file=sys.stderr)
    if chat:
        server.health.append(lambda: {"chat_model": chat_name, "chat_device": backend.device})
    shown = chat_name if chat else "no chat model (chat answers 501)"
    server.about.append(lambda: [("Chat", shown, None)])
    temperature = config["temperature"]

    @app.post("/v1/chat/completions")
    @app.post("/v1beta/chat/completions")  # the path of Tabby 0.7-0.10, which clients fall back to
    def chat_route():
        if chat is None:
            how = "--chat-model (a GGUF file, a Hugging Face repo id, or 'same')"
            abort(501, f"no chat model: start the server with {how}")
        req = parse_chat(json_body(body_of(request)), stream=request.path.startswith("/v1beta/"))
        req.user = g.user or req.user
        chat_id, created = f"chatcmpl-{uuid.uuid4()}", int(time.time())
        steps, size = chat.chat(req, sampling(req, temperature), ClientGone(request.environ))

        def done(text, n, reason):
            """Log the answer; -> its finish reason, in OpenAI's words."""
            if reason != "cancelled":
                output = {"role": "assistant", "content": text}
                full = {"completion_id": chat_id, "input": req.messages, "output": output}
                meta = {"completion_id": chat_id, "messages": len(req.messages),
                        "output": {"role": "assistant", "chars": len(text)}}  # fmt: skip
                server.events.write(req.user, {"chat_completion": full}, {"chat_completion": meta})
                server.counters.add("chat_answers_total")
            app.logger.info("%s: %d prompt tokens, %d generated, %s", chat_id, size, n, reason)
            return "length" if reason == "length" else "stop"

        def chunk(delta, finish_reason=None):
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            event = {"id": chat_id, "object": "chat.completion.chunk", "created": created,
                     "model": chat_name, "choices": [choice]}  # fmt: skip
            return "data: " + json.dumps(event, ensure_ascii=False) + "\n\n"

        if req.stream:
            stream = chat_stream(steps, req.stop, chunk, done, app.logger)
            headers = {"Cache-Control": "no-cache"}
            return app.response_class(stream, mimetype="text/event-stream", headers=headers)
        text, n, reason = end = finish(steps)
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done(*end)}
        usage = {"prompt_tokens": size, "completion_tokens": n, "total_tokens": size + n}
        return jsonify(id=chat_id, object="chat.completion", created=created, model=chat_name,
                       choices=[choice], usage=usage)  # fmt: skip


# -----------------------------------------------------------------------------------------------
# Speculation (--speculate): in the model's idle time, the completion the editor will ask for if
# the user accepts the one shown (llama.vim's speculative FIM), kept in the completion cache. One
# job on the model's queue; a request that comes stops it, within a token's decode.

# fmt: off
CONFIG.update({
    "speculate": (True, "when the model is idle, compute the completion the editor will ask for "
                        "if the user accepts the one shown (needs --completion-cache)"),
})
# fmt: on


AGENT_LINES = 20  # lines before the cursor that tabby-agent sends, the cursor's own too


def accepted_prefix(prefix, text):
    """The prefix tabby-agent sends once the user accepts text: prefix and text, in its window
    of AGENT_LINES lines. (A prefix already longer came from another client: all of it.)"""
    if prefix.count("\n") >= AGENT_LINES:
        return prefix + text
    lines = (prefix + text).split("\n")
    return "\n".join(lines[-AGENT_LINES:])


def speculate(model, prompt, sampling, limits):
    """The Answer to prompt, on the model thread, or None when limits.should_stop() first (a
    request came): then the tokens made so far stay in model.ahead, for a request of this prompt
    to go on from, and the editor's KV cache in a copy, for its next keystroke."""
    llm, done, t = model.llm, [], time.perf_counter()
    model.ahead = {tuple(prompt.tokens): done}  # one at a time: an older one goes
    model.use_kv_for(prompt.tokens, 1, idle=True)
    keep_kv(llm, prompt.tokens)
    tokens = model_tokens(llm, prompt.tokens, *sampling, limits.should_stop, every=0)

    def pieces():
        for token in tokens:
            done.append(token)
            yield token_bytes(model.vocab, token)

    try:  # should_stop() is asked inside each token's decode too: a request waits for none
        with abortable(llm, limits.should_stop, every=0):  # (cheap: an int compared)
            text, n, reason = finish(generate(pieces(), *limits))
    except RuntimeError as e:
        if not aborted(e):
            raise
        return None
    finally:
        tokens.close()
    if reason == "cancelled":
        return None
    model.ahead, model.idle_kv = {}, True  # finished: no request goes on from it
    return Answer(text, reason=reason, generated=n, ms=(time.perf_counter() - t) * 1000)


def add_speculation(server):
    """After each answer is sent, the completion of the request that accepting it would make,
    unless a request comes first (then it stops, and one for its prompt goes on from it)."""
    config, model, completions = server.config, server.backend, server.completions
    if not (config["speculate"] and config["completion_cache"] and isinstance(model, LocalModel)):
        return
    logger = server.app.logger

    def look_ahead(req, answer, arrivals):
        """On the request's thread, once answer is sent (arrivals: the count when it came). Not
        after a typed-through answer: the one it comes from was speculated on."""
        if not answer.text or answer.reason == "typed through":
            return
        if req.raw_prompt is not None or req.wants_variety:
            return
        stale = lambda: completions.arrivals != arrivals  # noqa: E731
        segments = dict(req.segments, prefix=accepted_prefix(req.segments["prefix"], answer.text))
        ahead = dataclasses.replace(req, segments=segments)
        job = None if stale() else completions.prepare(ahead, stale)
        key = job and job.key(req.language)
        with completions.lock:
            if job is None or key in completions.cache:
                return
        limits = Limits(completions.max_tokens, job.end_of, stale, completions.budget)
        sampled = sampling(ahead, completions.temperature)

        def run():  # on the model thread, after any request queued before it
            try:
                out = None if stale() else speculate(model, job.prompt, sampled, limits)
            except Exception:  # (the server stopping, say): this one is lost, not the model
                return logger.exception("a speculation failed")
            if out is not None and out.reason not in UNKEPT:
                completions.keep(key, out, ahead=True)
                logger.info("speculation: %d prompt tokens, %d generated, %s; %.1f ms",
                            job.prompt.size, out.generated, out.reason, out.ms)  # fmt: skip

        model.thread.submit(run)

    completions.answered.append(look_ahead)


# -----------------------------------------------------------------------------------------------
# Drafts (--draft N): code copies itself (a block's closing lines, arguments written a few lines
# up, a pattern repeated in the file), so what followed the last few tokens where they occurred
# before, in the prompt or the output, is a likely draft of the next ones. The model checks a
# draft in one batch and keeps what it would have sampled itself. A batch row costs little on a
# GPU or with a small vocabulary; with a large one on a CPU it costs nearly a token
# (bench/drafts.py measures it), hence off by default.

# fmt: off
CONFIG.update({
    "draft": (0, "tokens drafted from the document after each generated one and checked in one "
                 "batch: faster where a batch row costs little (bench/drafts.py says); 0: none"),
})
# fmt: on

DRAFT_MATCH = 4  # tokens that must match an earlier occurrence for what followed it to be drafted


def drafting(llm, most):
    """A generate() for llm, in place of llama-cpp-python's, for a prompt already evaluated (as
    model_tokens leaves it): after each token it drafts up to most tokens, those that followed
    the newest earlier occurrence of the last DRAFT_MATCH tokens, and decodes the token and its
    draft in one batch. Each row is sampled in turn and compared with the draft: every token is
    the model's own sample (the same distribution as one at a time; at temperature 0 the same
    text, but where llama.cpp's batched arithmetic tips a near tie), and the KV cache drops the
    draft from the first token that differs."""

    def generate(tokens, temp, repeat_penalty):
        sampler = llm._init_sampler(temp=temp, repeat_penalty=repeat_penalty)
        memory, batch = llama_cpp.llama_get_memory(llm.ctx), llm._batch.batch
        history, seen, draft, row = list(tokens), {}, [], -1

        def saw(end):  # the n-gram that ends before end was last seen there
            if end >= DRAFT_MATCH:
                seen[tuple(history[end - DRAFT_MATCH : end])] = end

        for end in range(len(history)):
            saw(end)
        while True:
            for i in range(len(draft) + 1):  # the rows of the last decode (-1: the prompt's)
                token = sampler.sample(llm._ctx, row + i)
                yield token
                history.append(token)
                saw(len(history) - 1)
                if i == len(draft) or token != draft[i]:
                    break
            llm.n_tokens -= len(draft) - i  # what was drafted after a token that differs
            llama_cpp.llama_memory_seq_rm(memory, 0, llm.n_tokens, -1)
            at = seen.get(tuple(history[-DRAFT_MATCH:]))
            room = min(most, llm.n_ctx() - llm.n_tokens - 1, llm.n_batch - 1)
            draft = history[at : at + room] if at is not None else []
            todo, row = [token, *draft], 0
            batch.n_tokens = len(todo)
            for j, t in enumerate(todo):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = t, llm.n_tokens + j, 1
                batch.seq_id[j][0], batch.logits[j] = 0, True
            status = llama_cpp.llama_decode(llm.ctx, batch)
            if status:  # (as llm.eval says it: 2 is an abortable() decode stopped)
                raise RuntimeError(f"llama_decode returned {status}")
            llm.input_ids[llm.n_tokens : llm.n_tokens + len(todo)] = todo
            llm.n_tokens += len(todo)

    return generate


def add_drafts(server):
    """With --draft N, the local model's Llama generates with drafts (its chat model does not)."""
    model, most = server.backend, server.config["draft"]
    if most < 0 or most and not isinstance(model, LocalModel):
        raise SystemExit("error: --draft must be 0 or more, for a local model (--model)")
    if most:
        model.llm.generate = drafting(model.llm, most)
        print(f"drafts: up to {most} tokens, after a {DRAFT_MATCH}-token match", file=sys.stderr)


# -----------------------------------------------------------------------------------------------
# Repository context (--repo): the team's code, chunked and indexed in SQLite (FTS5, BM25), and
# for each completion the chunks most likely to help at the cursor: first those that define a
# name used near it (the function being called, the class being built), then Tabby's BM25 over
# the prefix's words. Tabby's rules (crates/tabby/src/services/code.rs, completion_prompt.rs,
# crates/tabby-index/src/code/) where they are the point: the same filters, chunk size, budget.

# fmt: off
CONFIG.update({
    "repo": ((), "a repository whose code completions draw on: a git checkout, or a git URL "
                 "cloned into ROOT/repositories; once for each (index: ROOT/index/code.sqlite3)"),
    "repo_refresh": (60, "seconds between looks at the repositories for changes (a URL's remote: "
                         "60 times as long)"),
    "repo_context_tokens": (1024, "tokens of repository context, for a model that has "
                                  "repository-level tokens (Qwen2.5-Coder, StarCoder2)"),
})
# fmt: on

# file extension -> language, as the editor names it
EXTENSIONS = {
    ".py": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".jsx": "javascriptreact", ".ts": "typescript", ".tsx": "typescriptreact", ".go": "go",
    ".rs": "rust", ".java": "java", ".kt": "kotlin", ".rb": "ruby", ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".cs": "csharp", ".php": "php", ".lua": "lua",
    ".scala": "scala", ".dart": "dart", ".ex": "elixir", ".exs": "elixir", ".r": "r",
    ".sol": "solidity", ".ml": "ocaml", ".gd": "gdscript",
}  # fmt: skip
CHUNK_CHARS = 512  # most characters in a chunk (Tabby's), cut at line boundaries
NEAR_LINES = 3  # lines before the cursor (and after it) whose names are looked up as definitions
MIN_BM25 = 8.0  # least BM25 score of a chunk found by words alone (Tabby's min_bm25_score)
BM25_TERMS = 8  # the rarest of the prefix's words a BM25 search uses (all of them: slow)
COMMON = 0.01  # a word in more than this share of a repository's chunks is too common to search
DEFINED_MAX = 50  # a name defined in more chunks than this (x, name, data) is not looked up
PER_NAME = 3  # chunks that define one name, at most, the first found
MIN_ROOM = 256  # characters of snippet budget left, below which there is no search (Tabby's)
HEAD_POLL = 2  # seconds between looks at each checkout's HEAD (a commit: indexed at once)
# Repository-level tokens (repository name, file separator) of models trained on whole
# repositories, for those whose GGUF llama.cpp finds no fim_rep and fim_sep in (StarCoder2's)
REPO_TOKENS = [("<|repo_name|>", "<|file_sep|>"), ("<repo_name>", "<file_sep>")]
WORD = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{0,63}\b")  # an identifier; longer ones are not words
# the name being typed at the cursor, and what it is a member of: self.session.mer, utils.get_en
TYPING = re.compile(r"((?:[A-Za-z_]\w*\s*\.\s*)*)([A-Za-z_]\w*)$")
CLASS_BASES = re.compile(r"class[ \t]+\w+[ \t]*\(([^)]*)\)")  # class C(B, m.D): B, m.D
PARTIAL_MIN = 3  # characters of a name being typed, at least, before names beginning so are found
CANDIDATES = 8  # names beginning with the one being typed whose signatures are shown, at most
SIGNATURE_LINES = 4  # lines of a signature, at most (a def's arguments on lines of their own)
# words typed often that are no names to look up (so that typing them leaves the snippets be,
# and the KV cache after them): a keyword's start is not looked up until it is no longer one
KEYWORDS = {*keyword.kwlist, "self", "cls", "this", "const", "let", "var", "function", "func",
            "export", "package", "struct", "interface", "public", "private", "static", "void",
            "new", "print", "string", "int", "float"}  # fmt: skip
# what a file imports, and from where: Python's from M import a, b as c / import M.N as c, and
# JavaScript's import {a, b as c} from "./m" / import c from "./m"
IMPORTS = re.compile(
    r"^[ \t]*(?:from[ \t]+(?P<py_from>\.*[\w.]*)[ \t]+import[ \t]+"
    r"(?:\((?P<py_list>[^)]*)\)|(?P<py_names>[\w \t,]+))"
    r"|import\s+\{?(?P<js_names>[\w\s,]*)\}?\s*from\s*[\"'](?P<js_from>[^\"']+)"
    r"|import[ \t]+(?P<module>[\w.]+)(?:[ \t]+as[ \t]+(?P<alias>\w+))?)",
    re.M,
)
# a name a line defines: def f, class C, function f, func (r T) F, fn f, struct S, ..., or x =;
# the keyword begins the line's code, after annotations and modifiers (@Composable fun f, pub
# async fn f, template <T> class C): in prose ("the original function\n assigned") it defines
# nothing
DEFINES = re.compile(
    r"^[ \t]*(?:@[\w.]+(?:\([^)]*\))?[ \t]+|template[ \t]*<[^>]*>[ \t]*)*"
    r"(?:(?:export|default|declare|async|pub(?:\([^)]*\))?|public|private|protected|internal|"
    r"fileprivate|static|abstract|final|inline|override|open|data|sealed|partial|readonly|inner|"
    r"enum|case|implicit|companion|mutating|suspend|unsafe|const|local|typedef|class)[ \t]+)*"
    r"(?:def|class|function|func|fn|struct|enum|trait|interface|type|module|object|fun|macro)"
    r"[ \t]+(?:\([^)]*\)[ \t]*)?([A-Za-z_]\w*)"
    r"|^(?:export\s+)?(?:const|let|var|val)\s+([A-Za-z_]\w*)|^([A-Za-z_]\w*)\s*(?::[^=]*)?=[^=]",
    re.M,
)


def family(language):
    """The language family whose files can help a language (Tabby's: JavaScript and TypeScript
    are one)."""
    return LANGUAGE[language][0][0] if language in LANGUAGE else language


def indexable(text):
    """Whether Tabby indexes a file: no line over 300 characters, 150 on average at most, a
    quarter of it alphanumeric at least, half of it digits at most, 100,000 lines at most."""
    lines = text.splitlines()
    if not lines or len(lines) > 100_000 or max(map(len, lines)) > 300:
        return False
    if len(text) / len(lines) > 150:
        return False
    alphanumeric = sum(map(str.isalnum, text))
    return alphanumeric >= len(text) / 4 and sum(map(str.isdigit, text)) <= len(text) / 2


def chunks_of(text):
    """(first line's number, text) of each chunk of a file: whole lines, CHUNK_CHARS at most,
    cut where a chunk half that size meets a blank line or a line at column 0 (a definition
    starts there, more often than not); none starts or ends with blank lines."""
    chunks, lines, size, start = [], [], 0, 0
    for number, line in enumerate(text.splitlines(keepends=True)):
        starts_anew = not line.strip() or not line[0].isspace() and line[0] not in ")]}"
        if lines and (size + len(line) > CHUNK_CHARS or size >= CHUNK_CHARS // 2 and starts_anew):
            chunks.append((start, "".join(lines).rstrip() + "\n"))
            lines, size = [], 0
        if not lines and not line.strip():
            continue
        start = number if not lines else start
        lines.append(line)
        size += len(line)
    if lines:
        chunks.append((start, "".join(lines).rstrip() + "\n"))
    return chunks


def defined(body):
    """{name: rank} of the names a chunk defines, the rank telling how likely the definition is
    the one meant: 0 at the top level (a function, a class), 1 indented 4 columns at most (a
    method), 2 by an assignment, 3 indented more (a function inside one). The least rank of
    each name."""
    ranks = {}
    for match in DEFINES.finditer(body):
        indent = len(re.match(r"[ \t]*", match[0])[0].expandtabs(4))
        rank = 2 if match[3] else 0 if not indent else 1 if indent <= 4 else 3
        name = match[1] or match[2] or match[3]
        ranks[name] = min(rank, ranks.get(name, 3))
    return ranks


def signature(body, name):
    """The lines of body, a chunk, that define name: the first that does, and those after it
    until its parentheses close (def f(a,\n b):), SIGNATURE_LINES at most."""
    match = next(m for m in DEFINES.finditer(body) if name in m.groups())
    lines = body[body.rfind("\n", 0, match.start()) + 1 :].splitlines(keepends=True)
    depth = 0
    for n, line in enumerate(lines[:SIGNATURE_LINES]):
        depth += line.count("(") - line.count(")")  # (a brace opens a body: not counted)
        if depth <= 0:
            break
    return "".join(lines[: n + 1]).rstrip() + "\n"


def imported(text, path):
    """{name: [the files it may come from, as paths without extension; one ending in / may be a
    package, and all in it]} of the imports in text, a file at path (relative imports resolved
    from its folder)."""
    names, folder = {}, os.path.dirname(path)

    def resolve(source, python):  # -> a path from the repository's top, without extension
        if python:  # m.n, or relative: .m, ..m.n
            dots = len(source) - len(source.lstrip("."))
            if not dots:
                return source.replace(".", "/")
            source = "/".join([".."] * (dots - 1) + [source[dots:].replace(".", "/")])
        elif source[:1] != ".":  # a package
            return source
        where = os.path.normpath(os.path.join(folder, source))
        return "" if where == "." else where

    for m in IMPORTS.finditer(text):
        if m["module"]:  # import m.n (as c): m.n, a package perhaps, and all in it; m itself
            alias = m["alias"] or m["module"].split(".")[0]
            where = resolve(m["module"], True)
            names.setdefault(alias, []).extend([where + "/", where.split("/")[0]])
            continue
        python = m["py_from"] is not None
        where = resolve(m["py_from"] if python else m["js_from"], python)
        for item in (m["py_list"] or m["py_names"] or m["js_names"] or "").split(","):
            parts = item.split()  # a, or a as c
            if parts and parts[0].isidentifier():  # a name, or a module: from m import sub
                names.setdefault(parts[-1], []).extend([where, os.path.join(where, parts[0], "")])
    return names


def from_where(sources):
    """A function telling how surely a file is one of sources (from imported()): 0 it is (or is
    inside one ending in /, a package), 1 its path ends so (a package under src/, say), 2 not.
    It looks up the file's folders, not each source (a test file imports dozens), and keeps
    each file's answer: one is made for each lookup, and is gone with it."""
    whole = {s.rstrip("/") for s in sources}
    packages = {s.rstrip("/") for s in sources if s.endswith("/")}
    tails = {s.rstrip("/") for s in sources if s.strip("/")}

    @functools.cache
    def surely(file):
        parts = re.sub(r"(/__init__|/index)?\.\w+$", "", file).split("/")
        folders = ("/".join(parts[:n]) for n in range(1, len(parts)))
        if "/".join(parts) in whole or not packages.isdisjoint(folders):
            return 0
        return 1 if any("/".join(parts[n:]) in tails for n in range(1, len(parts))) else 2

    return surely


def normal_url(url):
    """A git URL as host/owner/name: no scheme, credentials, port or .git; scp-like ssh URLs
    (git@host:owner/name) too; a file:// URL or a path as its path."""
    url = url.strip().rstrip("/")
    url = url[:-4] if url.endswith(".git") else url
    if "://" in url:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "file":
            return parts.path.rstrip("/")
        return f"{parts.hostname or ''}{parts.path}".lower()
    scp = re.fullmatch(r"(?:[^@/]+@)?([^:/]+):(?!/)(.+)", url)
    return f"{scp[1]}/{scp[2]}".lower() if scp else url


class Repository(typing.NamedTuple):
    name: str  # its folder's name
    path: str  # its checkout
    urls: tuple  # normal_url()s of its remotes (and of the --repo URL)
    cloned: bool  # cloned from a URL here, and so fetched again now and then


def git(*args, cwd=None, timeout=600):
    """git's output for args, or CalledProcessError (TimeoutExpired) with what it said."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # a server cannot type a password
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=True, env=env)  # fmt: skip
    return done.stdout


def head_of(path):
    """The commit a checkout's HEAD names, or None (no commit yet, git failing)."""
    try:
        return git("rev-parse", "-q", "--verify", "HEAD", cwd=path, timeout=10).strip()
    except (subprocess.SubprocessError, OSError):
        return None


def is_url(spec):
    """Whether a --repo is a git URL (scheme://..., or scp-like user@host:path), not a path."""
    return re.match(r"[\w+.-]+://|[^@/\s]+@[^:/\s]+:", spec) is not None


def clone(url, folder):
    """git clone url into folder (a clone cut short there before is removed first); a clone that
    fails leaves none of the folders it made."""
    made, parent = [], os.path.dirname(folder)
    while not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        git("clone", "--quiet", url, folder)
    except BaseException:
        for path in made:  # the deepest first
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


def open_repository(spec, root):
    """The Repository --repo spec names: a git checkout, or a git URL cloned (once) into
    ROOT/repositories. SystemExit with one line when it cannot be."""
    if shutil.which("git") is None:
        raise SystemExit("error: --repo needs git, which is not installed (apt-get install git)")
    url = is_url(spec)
    if url:
        folder = os.path.join(root, "repositories", re.sub(r"[^\w.-]", "_", normal_url(spec)))
    else:
        folder = os.path.abspath(os.path.expanduser(spec))
        if not os.path.isdir(folder):
            raise SystemExit(f"error: --repo {spec}: no such folder")
    try:
        if url and not os.path.exists(os.path.join(folder, ".git")):
            clone(spec, folder)
        top = git("rev-parse", "--show-toplevel", cwd=folder).strip()
    except subprocess.CalledProcessError as e:
        what = "git clone failed" if url else "not a git checkout (git init it, or give its URL)"
        said = (e.stderr or "").strip().splitlines()
        raise SystemExit(f"error: --repo {spec}: {what}: {said[-1] if said else ''}") from None
    except subprocess.TimeoutExpired:
        raise SystemExit(f"error: --repo {spec}: git did not finish within 600 s") from None
    remotes = subprocess.run(["git", "config", "--get-regexp", r"^remote\..*\.url$"], cwd=top,
                             capture_output=True, text=True).stdout.split()[1::2]  # fmt: skip
    urls = {normal_url(u) for u in remotes} | {normal_url(spec) if url else top}
    name = normal_url(spec).rsplit("/", 1)[-1] if url else os.path.basename(top)
    return Repository(name, top, tuple(sorted(urls)), url)


SCHEMA_VERSION = 4  # an index made with another is made anew
SCHEMA = """
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS files (repo TEXT, path TEXT, mtime REAL, size INTEGER,
                                  PRIMARY KEY (repo, path));
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, repo TEXT, path TEXT, family TEXT,
                                   line INTEGER, body TEXT);
CREATE INDEX IF NOT EXISTS chunks_file ON chunks (repo, path);
CREATE VIRTUAL TABLE IF NOT EXISTS search USING fts5(body, content = 'chunks',
    content_rowid = 'id', tokenize = "unicode61 tokenchars '_'");
CREATE VIRTUAL TABLE IF NOT EXISTS vocab USING fts5vocab(search, 'row');
CREATE TABLE IF NOT EXISTS names (name TEXT, repo TEXT, family TEXT, chunk INTEGER,
                                  rank INTEGER);
CREATE INDEX IF NOT EXISTS names_name ON names (name, repo, family, rank, chunk);
CREATE INDEX IF NOT EXISTS names_chunk ON names (chunk);
"""


class CodeIndex:
    """The repositories' code at ROOT/index/code.sqlite3: chunks, their words (FTS5, for BM25)
    and the names they define (FTS5's own vocabulary counts the chunks each word is in). It owns
    the database (a connection that writes, used by start-up
    and then by its thread; one that reads, under a lock: SQLite's WAL lets it read while the
    other writes), the repositories and the thread that keeps the index up to date."""

    def __init__(self, repositories, path, refresh, logger):
        self.repositories, self.refresh, self.logger = repositories, refresh, logger
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.writer = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if self.writer.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            for (table,) in self.writer.execute(  # an index of another version: made anew
                "SELECT name FROM sqlite_master WHERE type = 'table' AND sql NOT LIKE '%shadow%'"
            ).fetchall():
                self.writer.execute(f'DROP TABLE IF EXISTS "{table}"')
            self.writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.writer.executescript(SCHEMA)
        self.reader = sqlite3.connect(path, check_same_thread=False)
        self.lock = threading.Lock()
        # what BM25 finds for the text above the cursor line, which stays while the user types
        # on a line (emptied when the index changes)
        self.bm25 = functools.lru_cache(maxsize=64)(self.bm25_search)
        self.counts = {}  # repository -> (files, chunks) in the index
        self.heads = {repo.path: head_of(repo.path) for repo in repositories}  # as indexed
        for repo in repositories:
            self.update(repo, progress=True)
        threading.Thread(target=self.keep_up, daemon=True, name="index").start()

    def update(self, repo, progress=False):
        """Index what changed in repo's checkout since last time (files told by mtime and size);
        -> how many files that was. With progress, a large first index shows a progress bar."""
        wanted = {}
        files = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=repo.path)
        for name in sorted(set(files.split("\0"))):  # in order: chunk ids rank definitions
            if os.path.splitext(name)[1].lower() in EXTENSIONS:
                try:
                    stat = os.stat(os.path.join(repo.path, name))
                except OSError:  # listed, but deleted in the checkout
                    continue
                wanted[name] = (stat.st_mtime, stat.st_size)
        query = "SELECT path, mtime, size FROM files WHERE repo = ?"
        known = {path: (m, s) for path, m, s in self.writer.execute(query, (repo.path,))}
        work = [(name, None) for name in known if name not in wanted]  # deleted files
        work += [(name, seen) for name, seen in wanted.items() if known.get(name) != seen]
        started, shown = time.monotonic(), progress and len(work) >= 200
        for n in range(0, len(work), 200):  # committed 200 files at a time: readers go on
            self.writer.execute("BEGIN")
            try:
                for name, seen in work[n : n + 200]:
                    self.forget(repo.path, name)
                    if seen:
                        self.add(repo.path, name, seen)
                self.writer.execute("COMMIT")
            except BaseException:
                self.writer.execute("ROLLBACK")
                raise
            if shown:
                done = min(n + 200, len(work))
                rate = done / (time.monotonic() - started)
                bar = f"\rindexing {repo.name}: {done}/{len(work)} files, {rate:.0f} files/s"
                print(bar, end="\n" if done == len(work) else "", file=sys.stderr, flush=True)
        query = "SELECT COUNT(DISTINCT path), COUNT(*) FROM chunks WHERE repo = ?"
        self.counts[repo.path] = self.writer.execute(query, (repo.path,)).fetchone()
        return len(work)

    def forget(self, repo, path):
        """Take a file's chunks out of the index."""
        where = "FROM chunks WHERE repo = ? AND path = ?"
        for chunk, body in self.writer.execute(f"SELECT id, body {where}", (repo, path)).fetchall():
            self.writer.execute("INSERT INTO search (search, rowid, body) VALUES ('delete', ?, ?)",
                                (chunk, body))  # fmt: skip
        self.writer.execute(f"DELETE FROM names WHERE chunk IN (SELECT id {where})", (repo, path))
        self.writer.execute(f"DELETE {where}", (repo, path))
        self.writer.execute("DELETE FROM files WHERE repo = ? AND path = ?", (repo, path))

    def add(self, repo, path, seen):
        """Put a file's chunks into the index, if Tabby would (see indexable)."""
        try:
            with open(os.path.join(repo, path), encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):  # gone meanwhile, or not text
            text = ""
        kind = family(EXTENSIONS[os.path.splitext(path)[1].lower()])
        for line, body in chunks_of(text) if text and indexable(text) else []:
            insert = "INSERT INTO chunks (repo, path, family, line, body) VALUES (?, ?, ?, ?, ?)"
            chunk_id = self.writer.execute(insert, (repo, path, kind, line, body)).lastrowid
            self.writer.execute("INSERT INTO search (rowid, body) VALUES (?, ?)", (chunk_id, body))
            names = [(name, repo, kind, chunk_id, rank) for name, rank in defined(body).items()]
            self.writer.executemany("INSERT INTO names VALUES (?, ?, ?, ?, ?)", names)
        self.writer.execute("INSERT INTO files VALUES (?, ?, ?, ?)", (repo, path, *seen))

    def keep_up(self):
        """Index what changed every --repo-refresh seconds, and within HEAD_POLL seconds of a
        new HEAD (a commit, a checkout, a pull); a cloned repository is pulled first, every 60
        refreshes."""
        poll = min(HEAD_POLL, self.refresh)
        every = max(1, round(self.refresh / poll))  # polls a refresh
        for n in itertools.count(1):
            time.sleep(poll)
            for repo in self.repositories:
                try:
                    if repo.cloned and n % (every * 60) == 0:
                        git("pull", "--ff-only", "--quiet", cwd=repo.path, timeout=300)
                    head = head_of(repo.path)
                    moved, self.heads[repo.path] = head != self.heads[repo.path], head
                    if (moved or n % every == 0) and self.update(repo):
                        self.bm25.cache_clear()
                except Exception:  # git or the disk failing: tried again next round
                    self.logger.exception("repository %s: cannot index it now", repo.name)

    def stats(self):
        """What /v1/health, the status page and start-up say of each repository (as of the last
        time it was indexed: no query on the request path)."""
        return [{"name": r.name, "path": r.path, "urls": list(r.urls),
                 "files": self.counts[r.path][0], "chunks": self.counts[r.path][1]}
                for r in self.repositories]  # fmt: skip

    def repository_for(self, git_url, filepath):
        """The repository a request is in: by its git_url as Tabby matches it (the normalised
        URL, else the name; several: the shortest URL); without one, by an absolute filepath
        inside a checkout, else the one repository when there is one; or None."""
        if git_url:
            wanted = normal_url(git_url)
            exact = [r for r in self.repositories if wanted in r.urls]
            named = sorted((len(u), i) for i, r in enumerate(self.repositories) for u in r.urls
                           if u.rsplit("/", 1)[-1] == wanted.rsplit("/", 1)[-1])  # fmt: skip
            if exact or named:
                return exact[0] if exact else self.repositories[named[0][1]]
            return None  # the editor is in another repository
        if filepath and os.path.isabs(filepath):
            inside = [r for r in self.repositories if filepath.startswith(r.path + os.sep)]
            if inside:  # nested checkouts: the innermost
                return max(inside, key=lambda r: len(r.path))
        return self.repositories[0] if len(self.repositories) == 1 else None

    def path_in(self, repo, filepath):
        """A request's filepath as a path in repo: relative to its checkout when inside it; an
        absolute path elsewhere (the editor's own clone) as its longest tail that is a file here;
        else as it is."""
        if not os.path.isabs(filepath):
            return filepath
        if filepath.startswith(repo.path + os.sep):
            return os.path.relpath(filepath, repo.path)
        parts = filepath.strip(os.sep).split(os.sep)
        with self.lock:
            for i in range(len(parts)):
                tail = "/".join(parts[i:])
                query = "SELECT 1 FROM files WHERE repo = ? AND path = ?"
                if self.reader.execute(query, (repo.path, tail)).fetchone():
                    return tail
        return filepath

    def find(self, repo, language, path, prefix, suffix, budget, known=""):
        """Snippets ({filepath, body, score}) of repo's code for a cursor between prefix and
        suffix in the file at path, in the order they may help, their bodies budget characters
        at most in all: first the signatures of the names that begin with the one being typed,
        then the chunks that define a name used near the cursor, then those Tabby's BM25 finds
        for the prefix's words (above the cursor line: typing on a line leaves them be, and so
        the KV cache); at most 2 a file, none of path's, none whose text is in known (the
        prompt, the editor's snippets)."""
        kind, path = family(language), os.path.normpath(path or "")
        above, line = prefix[: prefix.rfind("\n") + 1], prefix[prefix.rfind("\n") + 1 :]
        typing = TYPING.search(line)
        line = line[: typing.start(2)] if typing else line  # not a name yet: found by its start
        near = "\n".join(above.splitlines()[-NEAR_LINES:] + [line])
        before = WORD.findall(near)[::-1]  # the nearest the cursor first
        after = WORD.findall("\n".join(suffix.splitlines()[:NEAR_LINES]))
        names = list(dict.fromkeys(before + after))
        with self.snapshot():
            query = "SELECT body FROM chunks WHERE repo = ? AND path = ?"
            bodies = [body for (body,) in self.reader.execute(query, (repo.path, path))]
            text, head = "".join(bodies), "".join(b for b in bodies if "import" in b)
            imports = imported(head + prefix, path)  # the file's, as indexed, and those in view
            found = self.completing(repo.path, kind, path, imports, typing, prefix, suffix, text,
                                    budget)  # fmt: skip
            found += self.definitions(repo.path, kind, names, imports)
            found += self.bm25(repo.path, kind, above)
        picked, per_file, used, known = {}, collections.Counter(), 0, known + prefix + suffix
        for chunk, file, body, score in found:
            if chunk in picked or file == path or per_file[file] >= 2:
                continue
            if used + len(body) > budget or body.strip() in known:
                continue
            picked[chunk] = {"filepath": file, "body": body, "score": score}
            per_file[file], used = per_file[file] + 1, used + len(body)
        return list(picked.values())

    @contextlib.contextmanager
    def snapshot(self):
        """The reader, under the lock, in one read transaction: a lookup's statements see one
        version of the index, whatever the indexer commits meanwhile (WAL keeps it)."""
        with self.lock:
            self.reader.execute("BEGIN")
            try:
                yield
            finally:
                self.reader.execute("COMMIT")

    def completing(self, repo, kind, path, imports, typing, prefix, suffix, text, budget):
        """[(key, path, signatures, score)] of the CANDIDATES likeliest names beginning with the
        one being typed (PARTIAL_MIN characters at least), each as its signature (see
        signature), one snippet a file, budget characters in all. Likeliest: imported by name
        (after a dot: from the module it is a member of, if any; after self.: from a class the
        file's classes derive from), then from a file the file imports, of the kind wanted (a
        method after a dot, else a top-level one), used in view, used most in the file (text),
        the shortest.
        The list stays while the name is typed, and so does the prompt after it (the KV cache):
        it is that of the names beginning with the shortest start of the typed name whose
        likeliest that fit (CANDIDATES at most) hold the likeliest name that begins with all of
        it."""
        if not typing or len(typing[2]) < PARTIAL_MIN:
            return []
        members, partial = [m.strip() for m in typing[1].split(".")][:-1], typing[2]
        if not members and any(word.startswith(partial) for word in KEYWORDS):
            return []  # (after a dot, no keyword comes)
        start = partial[:PARTIAL_MIN]
        rows = self.reader.execute(
            "SELECT n.name, n.rank, n.chunk, c.path FROM names n JOIN chunks c ON c.id = n.chunk "
            "WHERE n.name >= ? AND n.name < ? AND n.repo = ? AND n.family = ? AND c.path != ?",
            (start, start[:-1] + chr(ord(start[-1]) + 1), repo, kind, path)).fetchall()  # fmt: skip
        module = imports.get(members[0], []) if members else []  # utils.get_e: utils' file
        module = [os.path.join(stem, *members[1:]).rstrip("/") for stem in module]
        inherited = set()  # self.name: from a class that the file's classes derive from
        if members in (["self"], ["cls"]):  # (not self.x.name: x's)
            inherited = self.bases(repo, kind, path, imports, text + prefix)
        used = set(WORD.findall(prefix[: -len(partial)] + suffix))  # in view
        uses = collections.Counter()  # in the file: its words that begin so (\b: 5 times as slow)
        for m in re.finditer(start + r"\w*", text):
            before = text[m.start() - 1 : m.start()]
            uses[m[0]] += not (before.isalnum() or before == "_")
        method = bool(members) and not module  # obj.name: a method; module.name: a function
        in_module, imported_from = from_where(module), from_where(sum(imports.values(), []))

        def likely(row):
            name, rank, chunk, file = row
            if members:  # x.name: from x's module
                named = 0 if file in inherited else in_module(file)
            else:
                named = from_where(imports[name])(file) if name in imports else 2
            return (named, imported_from(file), rank != method, name not in used, -uses[name],
                    len(name), chunk)  # fmt: skip

        ranked = {}  # each name once, as its likeliest definition, the likeliest first
        for row in sorted(rows, key=likely):
            ranked.setdefault(row[0], row)
        best = next((name for name in ranked if name.startswith(partial)), None)
        if best is None:
            return []
        signed = {}  # name -> its signature, fetched when needed

        def fitting(begins):  # the likeliest names beginning so whose signatures fit budget
            shown, size = [], 0
            for name in (n for n in ranked if n.startswith(begins)):
                if len(shown) == CANDIDATES:
                    break
                if name not in signed:
                    [(_, _, body, _)] = self.bodies([ranked[name][2]])
                    signed[name] = signature(body, name)
                size += len(signed[name])
                if size > budget:
                    break
                shown.append(name)
            return shown

        for end in range(PARTIAL_MIN, len(partial) + 1):
            shown = fitting(partial[:end])
            if best in shown:
                break
        signatures = {}  # path -> its names' signatures
        for name in shown:
            file = ranked[name][3]
            signatures[file] = signatures.get(file, "") + signed[name]
        return [(("signatures", file), file, body, 1.0) for file, body in signatures.items()]

    def bases(self, repo, kind, path, imports, text):
        """The files that define the classes that text's classes derive from (class C(B) or
        class C(m.B), B or m imported), each from where it is imported or inside it (from
        unittest import TestCase: unittest/case.py)."""
        wanted = {}  # B -> the files and packages it comes from
        for match in CLASS_BASES.finditer(text):
            for base in match[1].split(","):  # (metaclass=M, Generic[T]: no class of the file)
                parts = [part.strip() for part in base.split(".")]
                if all(map(str.isidentifier, parts)) and parts[0] in imports:
                    wanted[parts[-1]] = [s.rstrip("/") + "/" for s in imports[parts[0]]]
        if not wanted:
            return set()
        rows = self.reader.execute(
            "SELECT n.name, c.path FROM names n JOIN chunks c ON c.id = n.chunk WHERE n.rank = 0 "
            f"AND n.repo = ? AND n.family = ? AND c.path != ? AND n.name IN "
            f"({','.join('?' * len(wanted))})", (repo, kind, path, *wanted)).fetchall()  # fmt: skip
        return {file for name, file in rows if from_where(wanted[name])(file) == 0}

    def definitions(self, repo, kind, names, imports):
        """(chunk, path, body, score) of the chunks that define names, in the names' order, at
        most PER_NAME for each (from a file the file imports first, then top-level definitions:
        see defined); none for a name defined in more than DEFINED_MAX chunks (x, name, data:
        too common to tell)."""
        if not names:
            return []
        rows = self.reader.execute(
            "SELECT n.name, n.rank, n.chunk, c.path FROM names n JOIN chunks c ON c.id = n.chunk "
            f"WHERE n.repo = ? AND n.family = ? AND n.name IN ({','.join('?' * len(names))})",
            (repo, kind, *names))  # fmt: skip
        chunks, paths = {}, {}
        for name, rank, chunk, path in rows:
            chunks.setdefault(name, []).append((rank, chunk))
            paths[chunk] = path
        chunks = {name: found for name, found in chunks.items() if len(found) <= DEFINED_MAX}
        imported_from, wanted = from_where(sum(imports.values(), [])), []
        likely = lambda found: (imported_from(paths[found[1]]), *found)  # noqa: E731
        for name in names:  # its likeliest first: from a file the file imports, then top-level
            wanted += [chunk for _, chunk in sorted(chunks.get(name, ()), key=likely)[:PER_NAME]]
        return self.bodies(wanted)

    def bodies(self, wanted):
        """(chunk, path, body, 1.0) of the chunks wanted, in that order."""
        marks = ",".join("?" * len(wanted))
        rows = self.reader.execute(
            f"SELECT id, path, body FROM chunks WHERE id IN ({marks})", wanted
        )
        bodies = {c: (path, body) for c, path, body in rows}
        return [(c, *bodies[c], 1.0) for c in dict.fromkeys(wanted)]

    def bm25_search(self, repo, kind, text):
        """(chunk, path, body, score) of the chunks that BM25 scores MIN_BM25 or more for the
        words of text (its BM25_TERMS rarest, none in more than a COMMON share of the chunks of
        all repositories), best first."""
        words = {word.lower() for word in WORD.findall(text)}  # as FTS5 finds them
        if not words:
            return []
        chunks = sum(chunks for _, chunks in self.counts.values())
        rare = self.reader.execute(
            f"SELECT term FROM vocab WHERE term IN ({','.join('?' * len(words))}) AND doc <= ? "
            f"ORDER BY doc LIMIT {BM25_TERMS}",
            (*words, max(10, COMMON * chunks)),
        ).fetchall()
        if not rare:
            return []
        query = " OR ".join(f'"{word}"' for (word,) in rare)
        rows = self.reader.execute(
            "SELECT c.id, c.path, c.body, -bm25(search) FROM search JOIN chunks c ON c.id = "
            "search.rowid WHERE search MATCH ? AND c.repo = ? AND c.family = ? ORDER BY rank "
            "LIMIT 50", (query, repo, kind)).fetchall()  # fmt: skip
        return [row for row in rows if row[3] >= MIN_BM25]


def open_index(config, logger):
    """The CodeIndex of the --repo repositories (cloned first, for a URL), at
    ROOT/index/code.sqlite3; start-up says what it holds."""
    root = os.path.expanduser(config["root"])
    specs = sorted(config["repo"], key=is_url)  # checkouts first: a mistake there costs no clone
    repositories = [open_repository(spec, root) for spec in specs]
    names = [r.path for r in repositories]
    if len(set(names)) < len(names):
        raise SystemExit("error: --repo: the same repository twice")
    index = CodeIndex(repositories, os.path.join(root, "index", "code.sqlite3"),
                      config["repo_refresh"], logger)  # fmt: skip
    for r in index.stats():
        urls = ", ".join(r["urls"])
        print(f"repository {r['name']} at {r['path']} ({urls}): {r['files']} files, "
              f"{r['chunks']} chunks indexed", file=sys.stderr)  # fmt: skip
    return index


def repo_tokens(llm):
    """[(id, text)] of the model's repository-name and file-separator tokens (llama.cpp's, else
    REPO_TOKENS'), or [] when it has none."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ids = [llama_cpp.llama_vocab_fim_rep(vocab), llama_cpp.llama_vocab_fim_sep(vocab)]
    if min(ids) >= 0:  # (-1: no such token)
        return [(i, llama_cpp.llama_vocab_get_text(vocab, i).decode()) for i in ids]
    for names in REPO_TOKENS:
        ids = [special_token(llm, name) for name in names]
        if None not in ids:
            return list(zip(ids, names))
    return []


def repo_head(model, ids, budget, name, path, found):
    """(a Prompt, its snippets) of the repository's chunks found, as llama.cpp's /infill lays
    them out before the prompt for a model with repository-level tokens (ids: [(id, text)]):
    <|repo_name|>name, then for each file <|file_sep|>path and its text, then <|file_sep|> and
    the current file's path; the last files left out until it fits budget tokens."""
    (rep, rep_text), (sep, sep_text) = ids
    while True:
        pieces = [rep, name + "\n"]
        for snippet in found:
            pieces += [sep, f"{snippet['filepath']}\n{snippet['body']}"]
        pieces += [sep, path + "\n"]
        tokens = [t for p in pieces for t in ([p] if isinstance(p, int) else model.tokenize(p))]
        if len(tokens) <= budget or not found:
            text = "".join(
                {rep: rep_text, sep: sep_text}[p] if isinstance(p, int) else p for p in pieces
            )
            return Prompt(tokens, text, len(tokens)), found
        found = found[:-1]


def add_repository_context(server):
    """With --repo, each request's prompt gets code from the repository it is in: in Tabby's
    comment block of snippets (768 characters with the editor's), or, for a model with
    repository-level tokens, as files before the prompt (--repo-context-tokens)."""
    config = server.config
    if not config["repo"]:
        return
    if not config["repo_refresh"] > 0:
        raise SystemExit("error: --repo-refresh must be more than 0 seconds")
    if config["repo_context_tokens"] < 0:
        raise SystemExit("error: --repo-context-tokens must be 0 or more")
    index, model = open_index(config, server.app.logger), server.backend
    ids = repo_tokens(model.llm) if isinstance(model, LocalModel) else []
    room = config["ctx"] - config["max_tokens"]
    budget = min(config["repo_context_tokens"], room // 2)  # at most half the prompt's room
    chars = config["repo_context_tokens"] * 3  # a token is 3 characters or more

    def context(req, snippets):
        seg = req.segments
        repo = index.repository_for(seg["git_url"], seg["filepath"])
        if repo is None:
            return [], None
        path = index.path_in(repo, seg["filepath"] or "")
        args = (repo, req.language, path, seg["prefix"], seg["suffix"] or "")
        known = "".join(s["body"] for s in snippets)
        if ids:
            found = index.find(*args, chars, known)
            return [], repo_head(model, ids, budget, repo.name, path, found) if found else None
        room = SNIPPET_BUDGET - len(known.encode())
        return (index.find(*args, room, known) if room > MIN_ROOM else []), None

    server.completions.context = context
    server.health.append(lambda: {"repositories": index.stats()})
    line = "{name}: {files} files, {chunks} chunks"
    server.about.append(lambda: [("Repository", line.format(**r), None) for r in index.stats()])


# -----------------------------------------------------------------------------------------------
# Status page and /metrics (GET /, GET /metrics), from the counters: HTML made here with inline
# CSS and SVG, no scripts, aggregates only (nothing of anyone's code); Prometheus' text format.

# name: (type, help). Each is tabbypy_ + name; labels are added where they are counted.
# fmt: off
METRICS = {
    "completions_total": ("counter", "Completion requests answered, by finish reason and language"),
    "completion_seconds": ("histogram", "Time to answer a completion request, in all"),
    "completion_model_seconds": ("histogram", "Time a completion spent in the model or engine"),
    "prompt_tokens_total": ("counter", "Prompt tokens of the completions"),
    "reused_tokens_total": ("counter", "Prompt tokens that the KV cache already held"),
    "generated_tokens_total": ("counter", "Tokens generated for completions"),
    "events_total": ("counter", "Events logged, by type"),
    "events_lost_total": ("counter", "Events that could not be written to the events log"),
    "chat_answers_total": ("counter", "Chat answers"),
    "engine_errors_total": ("counter", "Failed requests to the engine, by the status we answered"),
    "speculations_total": ("counter", "Completions computed ahead in idle time, used or wasted"),
    "requests_waiting": ("gauge", "Requests waiting for the model (local) or the engine's answer"),
    "kv_cache_bytes": ("gauge", "Bytes of KV caches kept for editors taking turns"),
    "start_time_seconds": ("gauge", "When the server started, in seconds since the epoch"),
}
# fmt: on


SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)  # Prometheus' buckets


def observe(values, name, seconds):
    """A histogram's sample: its bucket (cumulated when shown), its sum."""
    values[name, (("le", next((b for b in SECONDS if seconds <= b), math.inf)),)] += 1
    values[name + "_sum", ()] += seconds


def count_completions(counters):
    """The tell() that counts completions' times and tokens for /metrics (see Counters.told)."""

    def tell(ts, kind, cid, language, user, a, ms):
        if kind != "completion":
            return
        with counters.lock:
            reason = (("language", language), ("reason", a.reason if a else "cancelled"))
            counters.values["completions_total", reason] += 1
            observe(counters.values, "completion_seconds", ms / 1000)
            for name, n in zip(("prompt", "reused", "generated"),
                               (a.size, a.reused, a.generated) if a else ()):  # fmt: skip
                counters.values[name + "_tokens_total", ()] += n
            if a and a.reason != "typed through":
                observe(counters.values, "completion_model_seconds", a.ms / 1000)

    return tell


HISTORY_DAYS = 14  # days of tallies kept
RECENT_IDS = 10_000  # completions whose views and selects are matched to their day and language
BUCKET = math.log(1.02)  # latencies are tallied in buckets 2 % wide: percentiles within 1 %


def bucket(ms):
    """The latency bucket of ms milliseconds (see BUCKET)."""
    return round(math.log(max(ms, 0.01)) / BUCKET)


class Tallies:
    """What the page shows, told by the counters (see Counters.told): under a lock, a Tally (a
    Counter) of completions for each of the last HISTORY_DAYS days and of the last hour's
    minutes: "served", "cancelled", "typed", "prompt_tokens", "reused_tokens", ("total_ms" or
    "model_ms", bucket), and ("served", "viewed" or "selected", language, user). A view or
    select counts once for its completion, on its day and under its language (for the last
    RECENT_IDS completions)."""

    def __init__(self):
        self.lock, self.days, self.minutes = threading.Lock(), {}, {}  # day or minute -> Tally
        self.recent = collections.OrderedDict()  # completion id -> [language, day, views]

    def tell(self, ts, kind, cid, language, user, a, ms):
        day = time.strftime("%Y-%m-%d", time.gmtime(ts))
        with self.lock:
            if kind in ("view", "select"):
                language, day, views = self.seen(cid, "unknown", day)
                tally = self.tally(self.days, day, HISTORY_DAYS)
                for what in ("viewed", "selected")[: 2 if kind == "select" else 1]:
                    if what not in views:
                        views.add(what)
                        tally[what, language, user] += 1
                return
            tallies = [self.tally(self.days, day, HISTORY_DAYS)]
            if ts > time.time() - 3600:
                tallies.append(self.tally(self.minutes, int(ts // 60), 60))
            for tally in tallies:
                if a is None:
                    tally["cancelled"] += 1
                    continue
                typed = a.reason == "typed through"
                tally.update(served=1, typed=typed, prompt_tokens=a.size, reused_tokens=a.reused)
                tally["total_ms", bucket(ms)] += 1
                tally["model_ms", bucket(a.ms)] += not typed
                tally["served", language, user] += 1
            if a and cid:
                self.seen(cid, language, day)

    def seen(self, cid, language, day):
        """[language, day, views] of a recent completion (made for one not seen)."""
        if cid not in self.recent:
            self.recent[cid] = [language, day, set()]
            if len(self.recent) > RECENT_IDS:
                self.recent.popitem(last=False)
        return self.recent[cid]

    def tally(self, table, key, most):
        """table's Tally for key, made if new; the oldest go when there are more than most."""
        if key not in table:
            table[key] = collections.Counter()
            for old in sorted(table)[:-most]:
                del table[old]
        return table[key]

    def summary(self, now=None):
        """(the last hour's Tally, the last HISTORY_DAYS days', [(day, its Tally)] oldest first)."""
        now, none = time.time() if now is None else now, collections.Counter()
        ago = range(HISTORY_DAYS - 1, -1, -1)
        names = [time.strftime("%Y-%m-%d", time.gmtime(now - n * 86400)) for n in ago]
        with self.lock:  # sums made here are copies: the tallies go on changing
            hour = sum((t for m, t in self.minutes.items() if m > now // 60 - 60), none.copy())
            days = [(day, self.days.get(day, none).copy()) for day in names]
        return hour, sum((t for _, t in days), none.copy()), days


def percentile(tally, name, share):
    """The latency (ms) below which share of a Tally's completions fall, by name: "total_ms" or
    "model_ms"."""
    buckets = sorted((k[1], n) for k, n in tally.items() if isinstance(k, tuple) and k[0] == name)
    total, seen = sum(n for _, n in buckets), 0
    for b, n in buckets:
        seen += n
        if seen >= share * total:
            return math.exp(b * BUCKET)
    return None


PAGE_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d2430; background: #f6f7f9; margin: 0; }
main { max-width: 860px; margin: 0 auto; padding: 16px; }
h1 { font-size: 22px; margin: 8px 0 2px; } h2 { font-size: 17px; margin: 22px 0 8px; }
section { background: #fff; border: 1px solid #dde1e7; border-radius: 8px; padding: 4px 14px 12px;
          margin-bottom: 14px; overflow-x: auto; }
table { border-collapse: collapse; width: 100%; } td, th { padding: 5px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; } tr + tr td { border-top: 1px solid #eef0f3; }
th { font-weight: 600; color: #5a6372; font-size: 13px; }
.ok { color: #19753a; } .bad { color: #b3261e; } .note { color: #5a6372; font-size: 13px; }
.big { font-size: 28px; font-weight: 600; } svg { width: 100%; height: auto; }
.about td { text-align: left; } .about td:first-child { color: #5a6372; width: 7em; }
"""


def ms_text(ms):
    """A latency as the page shows it."""
    if ms is None:
        return "–"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def share_text(part, whole):
    return f"{100 * part / whole:.0f}%" if whole else "–"


# the rows of the completions table: (label, id, the text of a window's Tally)
SERVED_ROWS = [
    ("Completions served", "served", lambda t: str(t["served"])),
    ("Latency p50, in all", "p50", lambda t: ms_text(percentile(t, "total_ms", 0.5))),
    ("Latency p90, in all", "p90", lambda t: ms_text(percentile(t, "total_ms", 0.9))),
    ("Latency p50, in the model", "model-p50", lambda t: ms_text(percentile(t, "model_ms", 0.5))),
    ("Latency p90, in the model", "model-p90", lambda t: ms_text(percentile(t, "model_ms", 0.9))),
    ("Cancelled (the editor moved on)", "cancelled",
     lambda t: share_text(t["cancelled"], t["served"] + t["cancelled"])),
    ("Typed through (no model)", "typed", lambda t: share_text(t["typed"], t["served"])),
    ("Prompt tokens reused", "reused",
     lambda t: share_text(t["reused_tokens"], t["prompt_tokens"])),
]  # fmt: skip


def accepted_by(tally, index):
    """{name: Counter of served, viewed, selected} of a Tally's completions by language (index
    1) or user (2)."""
    out = collections.defaultdict(collections.Counter)
    for key, n in tally.items():
        if isinstance(key, tuple) and key[0] in ("served", "viewed", "selected"):
            out["(none)" if key[index] is None else key[index]][key[0]] += n
    return out


def accepted_totals(tally):
    """(completions viewed, completions selected) of a Tally."""
    rows = accepted_by(tally, 1).values()
    return sum(r["viewed"] for r in rows), sum(r["selected"] for r in rows)


def acceptance_table(title, kind, rows):
    """A table of completions by language or user, most viewed first; data-KIND names each
    row."""
    out = [f"<h2>{title}</h2><table><tr><th>{kind}</th><th>served</th><th>viewed</th>"
           "<th>selected</th><th>rate</th></tr>"]  # fmt: skip
    for name, r in sorted(rows.items(), key=lambda r: (-r[1]["viewed"], -r[1]["served"], r[0])):
        out.append(f'<tr data-{kind}="{html.escape(name)}"><td>{html.escape(name)}</td>'
                   f'<td class="served">{r["served"]}</td><td class="viewed">{r["viewed"]}</td>'
                   f'<td class="selected">{r["selected"]}</td>'
                   f'<td>{share_text(r["selected"], r["viewed"])}</td></tr>')  # fmt: skip
    return "".join(out) + "</table>"


def day_chart(days):
    """An inline SVG of the acceptance rate of each day, a bar each, oldest first."""
    width, height, gap = 40, 120, 6
    bars = []
    for i, (day, tally) in enumerate(days):
        viewed, selected = accepted_totals(tally)
        rate = selected / viewed if viewed else 0
        x, h = i * (width + gap), round(rate * height)
        title = f"{day}: {selected} selected of {viewed} viewed ({share_text(selected, viewed)})"
        bars.append(
            f'<g data-day="{day}" data-viewed="{viewed}" data-selected="{selected}">'
            f"<title>{title}</title>"
            f'<rect x="{x}" y="{height - h}" width="{width}" height="{h}" fill="#3b6fd4"/>'
            f'<rect x="{x}" y="{height}" width="{width}" height="2" fill="#c9ced6"/>'
            f'<text x="{x + width / 2}" y="{height + 16}" font-size="11" text-anchor="middle">'
            f"{day[5:]}</text>"
            f'<text x="{x + width / 2}" y="{height - h - 4}" font-size="11" text-anchor="middle">'
            f"{share_text(selected, viewed) if viewed else ''}</text></g>"
        )
    size = f'viewBox="0 -14 {max(1, len(days)) * (width + gap)} {height + 34}"'
    return f'<svg {size} role="img" aria-label="acceptance rate by day">{"".join(bars)}</svg>'


def status_page(about, hour, fortnight, days):
    """The HTML of the status page: about ([(label, text, ok: None, True or False)]), then the
    figures of the last hour and of the last HISTORY_DAYS days (Counters.summary())."""
    mark = {None: "", True: " class=ok", False: " class=bad"}
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td{mark[ok]}>{html.escape(text)}</td></tr>"
        for label, text, ok in about
    )
    served = "".join(f"<tr><td>{label}</td><td id=hour-{key}>{text(hour)}</td>"
                     f"<td id=days-{key}>{text(fortnight)}</td></tr>"
                     for label, key, text in SERVED_ROWS)  # fmt: skip
    viewed, selected = accepted_totals(fortnight)
    users = accepted_by(fortnight, 2)
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>tabbypy</title><style>{PAGE_STYLE}</style></head><body><main>",
        "<h1>tabbypy</h1><p class=note>A Tabby-compatible completion server</p>",
        f"<section><h2>What serves</h2><table class=about>{rows}</table></section>",
        f"<section><h2>Completions</h2><table><tr><th></th><th>last hour</th>"
        f"<th>last {HISTORY_DAYS} days</th></tr>{served}</table></section>",
        f'<section><h2>Accepted, last {HISTORY_DAYS} days</h2><p><span class=big id="rate">'
        f"{share_text(selected, viewed)}</span> of the completions the editors showed were "
        f'taken (<span id="selected">{selected}</span> of <span id="viewed">{viewed}</span>)</p>',
        day_chart(days),
        acceptance_table("By language", "language", accepted_by(fortnight, 1)),
        acceptance_table("By user", "user", users) if set(users) - {"(none)"} else "",
        "</section><p class=note>Figures of this process, and of the events log before it; "
        '<a href="/metrics">/metrics</a> has them for Prometheus.</p></main></body></html>',
    ]
    return "".join(parts)


def logged(folder, now):
    """The records of the events log's last HISTORY_DAYS days, oldest first; lines that are not
    one (another tool's, a torn one) are skipped."""
    for n in range(HISTORY_DAYS - 1, -1, -1):
        path = os.path.join(folder, time.strftime("%Y-%m-%d.json", time.gmtime(now - n * 86400)))
        with open(path, "rb") if os.path.isfile(path) else contextlib.nullcontext([]) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(record, dict) and isinstance(record.get("event"), dict):
                    yield record


def count_of(value, most=1e12):
    """value if it is a number from 0 to most (not a bool), else 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return value if ok and 0 <= value <= most else 0  # (NaN fails both)


def tally_history(tallies, record, named):
    """Count a record of the events log (of days before this process) in the tallies. The log
    is a file anyone may edit: a record this server did not write is skipped, and only users
    that named(user) keeps, and known languages, count apart, so that what clients send cannot
    grow the figures without bound."""
    kind, fields = next(iter(record["event"].items()))
    ts, user = count_of(record.get("ts"), 4e12) / 1000, record.get("user")  # (4e12 ms: 2096)
    if not isinstance(fields, dict) or not ts:
        return
    user = user if isinstance(user, str) and named(user) else None
    cid, language = fields.get("completion_id"), fields.get("language")
    cid = cid if isinstance(cid, str) else None
    language = language if language in (*LANGUAGE, "unknown") else language and "other" or "unknown"
    size, reused = (int(count_of(fields.get(key))) for key in ("prompt_tokens", "reused_tokens"))
    a = Answer(
        "", "", fields.get("finish_reason"), [], size, reused, 0, count_of(fields.get("model_ms"))
    )
    if kind in ("view", "select") and cid:
        tallies.tell(ts, kind, cid, None, user, None, 0)
    elif kind in ("completion", "completion_cancelled"):
        served = a if kind == "completion" else None
        tallies.tell(
            ts, "completion", cid, language, user, served, count_of(fields.get("total_ms"))
        )


def sample_value(value):
    """A sample's value as Prometheus reads it: integers whole, floats in full."""
    return str(value) if isinstance(value, int) else repr(float(value))


def label_text(labels):
    """{a="x",b="y"} of (name, value) pairs, values escaped as Prometheus' format asks."""

    def escape(value):
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels) + "}" if labels else ""


def metrics_text(values, gauges):
    """Prometheus' text format (0.0.4) of counters' values ({(name, labels): value}) and of the
    gauges asked for now ({name: value})."""
    lines = []
    for name, (kind, about) in METRICS.items():
        lines += [f"# HELP tabbypy_{name} {about}", f"# TYPE tabbypy_{name} {kind}"]
        if kind == "histogram":
            seen = 0
            for bound in (*SECONDS, math.inf):
                seen += values.get((name, (("le", bound),)), 0)
                le = "+Inf" if bound == math.inf else f"{bound:g}"
                lines.append(f'tabbypy_{name}_bucket{{le="{le}"}} {seen}')
            total = float(values.get((name + "_sum", ()), 0.0))
            lines += [f"tabbypy_{name}_sum {sample_value(total)}", f"tabbypy_{name}_count {seen}"]
            continue
        samples = sorted((labels, v) for (n, labels), v in values.items() if n == name)
        for labels, value in [((), gauges[name])] if name in gauges else samples:
            lines.append(f"tabbypy_{name}{label_text(labels)} {sample_value(value)}")
    return "\n".join(lines) + "\n"


def add_status_page(server):
    """GET / and /metrics, and the history of the last HISTORY_DAYS days read into the tallies
    (from the events log: a restart keeps the page's figures)."""
    config, counters, app, tallies = server.config, server.counters, server.app, Tallies()
    named = lambda user: user in (server.tokens or {}).values()  # noqa: E731  (a token names it)
    for record in logged(server.events.folder, time.time()):
        tally_history(tallies, record, named)
    counters.told += [tallies.tell, count_completions(counters)]
    server.guarded += ["/", "/metrics"]

    @app.after_request
    def ask_a_browser(response):  # for the token, as the password of any user name
        if request.path == "/" and response.status_code == 401:
            response.headers["WWW-Authenticate"] = 'Basic realm="tabbypy", charset="UTF-8"'
        return response

    @app.get("/")
    def status_route():
        up = int(time.time() - counters.started)
        days, hours, minutes = up // 86400, up // 3600 % 24, up // 60 % 60
        uptime = f"{days} d {hours} h {minutes} min" if days else f"{hours} h {minutes} min"
        kept = f" for {config['events_days']} days" if config["events_days"] else ""
        settings = (f"--max-tokens {config['max_tokens']}, --time-budget "
                    f"{config['time_budget']} ms, --kv-cache-mb {config['kv_cache_mb']}, "
                    f"--events {config['events']}{kept}")  # fmt: skip
        users = len(set((server.tokens or {}).values()) - {None})
        access = (
            f"{users} users' tokens" if users else "a token" if server.tokens else "open: no token"
        )
        about = [("Serves", line, None) for line in server.backend.describe()]
        about += [line for part in server.about for line in part()]
        about += [
            ("Version", f"Tabby API {TABBY_VERSION}, Python {platform.python_version()}", None),
            ("Up for", uptime, None),
            ("Settings", settings, None),
            ("Access", access, None),
        ]
        page = status_page(about, *tallies.summary())
        return app.response_class(page, mimetype="text/html")

    @app.get("/metrics")
    def metrics_route():
        with counters.lock:
            values = counters.values.copy()
        gauges = {**server.backend.figures(), "start_time_seconds": counters.started}
        text = metrics_text(values, gauges)
        return app.response_class(text, mimetype="text/plain; version=0.0.4; charset=utf-8")


# -----------------------------------------------------------------------------------------------
# Tokens per developer (--tokens FILE): a token each, whose user the events and the status page
# name. The file is read again when it changes (a thread looks every second), so that a token is
# revoked without a restart; a file that cannot be read keeps the tokens it had, one that is
# gone keeps none.

# fmt: off
CONFIG.update({
    "tokens": ("", "file of tokens, one per developer: a 'user token' pair a line (# comments); a "
                   "request's user is its token's; read again when it changes"),
})
# fmt: on


def read_tokens(path, bad=None):
    """{token: user} of a --tokens file: a "user token" pair a line, # comments. A line that is
    not one raises ValueError naming it, or with bad(error) is left out (so that a mistake made
    while revoking a token does not keep it)."""
    users, taken = {}, set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].split()
            error = None
            if fields and len(fields) != 2:
                error = f"line {n}: not a user name and a token"
            elif fields and fields[1] in taken:
                error = f"line {n}: a token given twice"
                users.pop(fields[1], None)  # whose is it? nobody's
            if error and bad is None:
                raise ValueError(error)
            if error:
                bad(error)
            elif fields:
                users[fields[1]] = fields[0]
            taken.update(fields[1:2])
    return users


def file_state(path):
    """What tells that a file changed (or None: there is none)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def add_tokens(server):
    """Each token of the file names its user; --token's still names nobody."""
    path, logger, single = server.config["tokens"], server.app.logger, server.tokens or {}
    if not path:
        return
    try:
        server.tokens, seen = {**read_tokens(path), **single}, file_state(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --tokens {path}: {getattr(e, 'strerror', None) or e}") from None

    def watch():
        nonlocal seen
        while True:
            time.sleep(1)
            if file_state(path) == seen:
                continue
            seen = file_state(path)
            bad = functools.partial(logger.error, "--tokens %s: %s: left out", path)
            try:
                users = read_tokens(path, bad) if seen else {}
            except OSError as e:
                logger.error("--tokens %s: %s; the tokens read before still hold", path, e.strerror)
                continue
            server.tokens = {**users, **single}  # whole: readers need no lock
            logger.info("--tokens %s: read again, %d users", path, len(users))

    threading.Thread(target=watch, daemon=True, name="tokens").start()


# -----------------------------------------------------------------------------------------------
# Hugging Face download: --model (and --chat-model) may be a repo id, owner/repo[:file.gguf],
# downloaded once into the hub's cache; from the cache alone when the hub cannot be reached.

TABBY_LAYOUT = "ggml/model-00001-of-00001.gguf"  # where Tabby's own model repos keep the GGUF


def reachable(url, timeout=3.0):
    """Whether url's host takes a TCP connection within timeout seconds, name lookup included;
    yes when a proxy is set (the hub's client goes through it)."""
    proxies = ("https_proxy", "http_proxy", "all_proxy")
    if any(os.environ.get(name) or os.environ.get(name.upper()) for name in proxies):
        return True
    parts, done, opened = urllib.parse.urlsplit(url), threading.Event(), []

    def connect():  # on a thread of its own: a name lookup cannot be given a timeout
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            opened.append(True)
        except (OSError, ValueError):
            pass
        done.set()  # also when it failed at once: no need to wait out the timeout

    threading.Thread(target=connect, daemon=True).start()
    done.wait(timeout)
    return bool(opened)


def offline_help(hub, repo, filename, offline):
    """What to do when the hub cannot be reached (or offline: HF_HUB_OFFLINE is set) and the
    model is not in its cache."""
    name = filename or (TABBY_LAYOUT if repo.startswith("TabbyML/") else "")
    fetch = (f"fetch {hub}/{repo}/resolve/main/{name} by hand" if name else
             f"fetch one of the .gguf files listed at {hub}/{repo}/tree/main by hand")  # fmt: skip
    if offline:
        return (f"HF_HUB_OFFLINE is set, and the model is not in the Hugging Face cache: {fetch} "
                "and pass its path (--model ./model.gguf), or unset HF_HUB_OFFLINE to download "
                "it")  # fmt: skip
    return (f"cannot reach the Hugging Face hub ({hub}), and the model is not in its cache: "
            f"{fetch} and pass its path (--model ./model.gguf); a model downloaded before "
            "starts without the hub with HF_HUB_OFFLINE=1")  # fmt: skip


def cached_gguf(huggingface_hub, repo, filename):
    """The path of repo's GGUF file in the Hugging Face cache (filename; else Tabby's layout, or
    the only .gguf file there), or None."""
    try:
        if filename:
            return huggingface_hub.hf_hub_download(repo, filename, local_files_only=True)
        folder = huggingface_hub.snapshot_download(repo, local_files_only=True)
    except Exception:  # not in the cache (the hub's own errors vary by version)
        return None
    ggufs = sorted(
        os.path.relpath(os.path.join(top, name), folder)
        for top, _, names in os.walk(folder)
        for name in names
        if name.endswith(".gguf")
    )
    name = TABBY_LAYOUT if TABBY_LAYOUT in ggufs else ggufs[0] if len(ggufs) == 1 else None
    return os.path.join(folder, name) if name else None


def download(repo_id, flag="--model"):
    """owner/repo[:file.gguf] from the Hugging Face hub into its cache, once, with a progress
    bar; from the cache alone when the hub cannot be reached (found out in a few seconds)."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise SystemExit(
            f"error: {flag} {repo_id} is a Hugging Face repo id, and downloading it needs "
            "huggingface_hub: pip install huggingface_hub (or pass a local .gguf file)"
        ) from None
    repo, _, filename = repo_id.partition(":")
    hub = constants.ENDPOINT  # HF_ENDPOINT, or the hub's own
    offline = bool(constants.HF_HUB_OFFLINE)
    if offline or not reachable(hub):
        path = cached_gguf(huggingface_hub, repo, filename)
        if path is None:
            raise SystemExit(
                f"error: {flag} {repo_id}: {offline_help(hub, repo, filename, offline)}"
            )
        return path
    try:
        if not filename:
            ggufs = [f for f in huggingface_hub.list_repo_files(repo) if f.endswith(".gguf")]
            if len(ggufs) != 1 and TABBY_LAYOUT not in ggufs:
                raise SystemExit(
                    f"error: {flag} {repo_id}: {len(ggufs)} GGUF files there "
                    f"({', '.join(ggufs[:8])}); pick one as {repo}:FILE"
                )
            filename = ggufs[0] if len(ggufs) == 1 else TABBY_LAYOUT
        return huggingface_hub.hf_hub_download(repo, filename)
    except Exception as e:  # no such repo, no such file, disk full: all end start-up the same way
        first = str(e).splitlines()[0] if str(e) else ""
        raise SystemExit(
            f"error: {flag} {repo_id}: download failed: {type(e).__name__}: {first} "
            "(or pass a local .gguf file)"
        ) from None


def add_hub_download(server):
    """Model values that are repo ids (owner/repo, not dir/x.gguf) and not paths: downloaded."""

    def locate(value, flag):
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+(?<!\.gguf)(:.+)?", value)
        return download(value, flag) if hub_id and not os.path.exists(value) else value

    server.locate = locate


# ===============================================================================================
# create_app(): the core's parts, and each capability attached to them. Delete a capability's
# line here, with its section and its knobs in CONFIG, and the rest still serves.


def create_app(config=None):
    """The Flask app. flask run calls it with nothing: config from the environment."""
    server = open_server(config)
    add_tokens(server)
    add_hub_download(server)
    add_engine(server)
    serve_completions(server)
    add_chat(server)
    add_repository_context(server)
    add_speculation(server)
    add_drafts(server)
    add_status_page(server)
    return server.app


if __name__ == "__main__":
    try:
        config = load_config(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")
    # Werkzeug's threaded server: the one the tests hold to slow and hostile clients, and the one
    # that lets a request see its editor hang up (ClientGone); run without its banner, whose
    # "development server" warning is Werkzeug's, not ours (README: "The HTTP server")
    httpd = make_server(config["host"], config["port"], create_app(config), threaded=True)
    print(f"serving on http://{config['host']}:{httpd.port} (Ctrl+C stops it)", file=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        httpd.serve_forever()
