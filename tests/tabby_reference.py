"""What a Tabby server does, written down from Tabby's own files: the reference side of the
tests' comparisons. Nothing here comes from app.py, so a mistake there cannot hide in both.

Source: TabbyML/tabby at TABBY_COMMIT (the v0.32.0 release; the snapshot's HEAD, 21b29048d7bc,
has the same files):
- crates/tabby-common/assets/languages.toml: LANGUAGES, each [[config]] entry's languages,
  line_comment (None where the entry has none) and top_level_keywords, in the file's order (exts
  and chunk_size, which only the indexer reads, left out);
- crates/tabby-common/src/languages.rs: DEFAULT_STOP_WORDS, UNKNOWN_LANGUAGE's line comment,
  and get_stop_words(), which stop_words() follows;
- crates/tabby-inference/src/code.rs and decoding.rs: decode(), Tabby's stop condition.

PROMPT_TEMPLATES come from TabbyML/registry-tabby's models.json at REGISTRY_COMMIT.
"""

TABBY_COMMIT = "d4c033a138646524c545a0ead22690ef8ec05175"
REGISTRY_COMMIT = "7a9d54ebee2720c1322cf05b6c8150512f95a029"  # 2025-05-21

# models.json's prompt_template values, and the first few models that have each
PROMPT_TEMPLATES = {
    "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>": ["StarCoder-1B", "StarCoder2-3B",
                                                             "CodeQwen-7B"],
    "<PRE> {prefix} <SUF>{suffix} <MID>": ["CodeLlama-7B", "CodeLlama-13B"],
    "<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>": ["DeepSeekCoder-1.3B",
                                                               "DeepSeek-Coder-V2-Lite"],
    "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>": ["CodeGemma-2B",
                                                                   "Qwen2.5-Coder-1.5B"],
    "[SUFFIX]{suffix}[PREFIX]{prefix}": ["Codestral-22B"],
}  # fmt: skip

# (languages, line_comment, top_level_keywords) of each entry of languages.toml
# fmt: off
LANGUAGES = [
    (["python"], "#", ["def", "from", "class", "import"]),
    (["rust"], "//",
     ["fn", "trait", "impl", "enum", "pub", "extern", "static", "trait", "unsafe", "use"]),
    (["java"], "//",
     ["abstract", "public", "private", "class", "const", "exports", "extends", "implements",
      "static", "import", "interface", "module", "package", "var", "enum", "return"]),
    (["kotlin"], "//",
     ["abstract", "public", "private", "companion", "class", "data", "const", "actual", "expect",
      "sealed", "suspend", "fun", "import", "interface", "package", "var", "val", "enum"]),
    (["javascript-typescript", "javascript", "typescript", "javascriptreact",
      "typescriptreact"], "//",
     ["abstract", "async", "class", "const", "export", "function", "interface", "module",
      "package", "type", "var", "enum", "let"]),
    (["go"], "//", ["func", "interface", "struct", "package", "type", "import", "var", "const"]),
    (["ruby"], "#",
     ["begin", "class", "def", "end", "ensure", "include", "module", "require", "rescue", "self"]),
    (["c"], "//",
     ["const", "enum", "extern", "inline", "register", "static", "struct", "typedef", "union",
      "volatile"]),
    (["cpp"], "//",
     ["auto", "class", "const", "concept", "enum", "extern", "inline", "namespace", "register",
      "static", "struct", "template", "typedef", "union", "volatile"]),
    (["csharp"], "//",
     ["class", "struct", "enum", "interface", "abstract", "static", "extern", "namespace",
      "using", "var", "dynamic", "async"]),
    (["php"], "//",
     ["abstract", "class", "const", "declare", "extends", "final", "finally", "function",
      "global", "implements", "include_once", "include", "interface", "namespace", "private",
      "protected", "public", "require_once", "require", "static", "trait", "use"]),
    (["solidity"], "//",
     ["contract", "interface", "error", "library", "struct", "enum", "function", "type"]),
    (["dart"], "//",
     ["abstract", "class", "late", "var", "final", "const", "export", "interface", "type",
      "enum", "int", "String", "double", "DateTime", "typedef"]),
    (["elixir"], "#",
     ["def", "defp", "defmacro", "defmacrop", "module", "use", "import", "alias", "require",
      "if", "unless", "case", "cond", "with", "try", "catch", "throw", "receive", "after", "do",
      "end"]),
    (["r"], "#", ["function", "library", "install.packages"]),
    (["css"], None, []),
    (["dockerfile"], None, []),
    (["haskell"], None, []),
    (["html"], None, []),
    (["julia"], None, []),
    (["lua"], "--",
     ["and", "break", "do", "else", "elseif", "end", "false", "for", "function", "if", "in",
      "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while"]),
    (["makefile"], None, []),
    (["markdown"], None, []),
    (["txt"], None, []),
    (["perl"], None, []),
    (["powershell"], None, []),
    (["sql"], None, []),
    (["scala"], "//",
     ["abstract", "case", "class", "def", "do", "else", "enum", "extends", "final", "for",
      "given", "if", "implicit", "import", "lazy", "match", "new", "object", "override",
      "package", "private", "protected", "return", "sealed", "then", "throw", "trait", "try",
      "type", "val", "var", "while", "with", "yield"]),
    (["shellscript"], None, []),
    (["tex"], None, []),
    (["vb"], None, []),
    (["ocaml"], None,
     ["and", "as", "assert", "begin", "class", "constraint", "do", "done", "downto", "else",
      "end", "exception", "external", "for", "fun", "function", "functor", "if", "in", "include",
      "inherit", "initializer", "lazy", "let", "match", "method", "module", "mutable", "new",
      "nonrec", "object", "of", "open", "private", "rec", "sig", "struct", "then", "to", "try",
      "type", "val", "virtual", "when", "while", "with"]),
    (["gdscript"], "#", ["var", "const", "enum", "func", "class", "class_name", "extends"]),
]
# fmt: on

# languages.rs's DEFAULT: a blank line (also followed by 2-14 spaces or 1-7 tabs, which a tokenizer
# emits as one piece), and special tokens of StarCoder, CodeLlama, CodeGemma and chat_ml
DEFAULT_STOP_WORDS = [
    "\n\n", "\n\n  ", "\n\n    ", "\n\n      ", "\n\n        ", "\n\n          ",
    "\n\n            ", "\n\n              ",
    "\n\n\t", "\n\n\t\t", "\n\n\t\t\t", "\n\n\t\t\t\t", "\n\n\t\t\t\t\t",
    "\n\n\t\t\t\t\t\t", "\n\n\t\t\t\t\t\t\t",
    "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>",
    " <EOT>",
    "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>",
    "<|system|>", "<|user|>", "<|end|>", "<|assistant|>",
]  # fmt: skip

# every language id in the table; any other gets UNKNOWN_LANGUAGE, whose line comment is ""
LANGUAGE_IDS = [name for names, _, _ in LANGUAGES for name in names]
UNKNOWN_COMMENT = ""


def stop_words(language):
    """Language::get_stop_words(): DEFAULT, "\n" + the line comment when there is one, "\n" +
    each top-level keyword. An unknown language's empty comment makes "\n" a stop word."""
    entry = next((e for e in LANGUAGES if language in e[0]), ([], UNKNOWN_COMMENT, []))
    _, comment, keywords = entry
    return (
        DEFAULT_STOP_WORDS
        + ([] if comment is None else ["\n" + comment])
        + ["\n" + word for word in keywords]
    )


def decode(pieces, language, prompt=""):
    """The text a Tabby server answers when its engine streams pieces for a prompt: after each
    non-empty piece, if prompt + text so far ends with stop words, the text loses the longest of
    them (all of it, when the stop word began in the prompt), and generation ends."""
    words, text = stop_words(language), ""
    for piece in pieces:
        text += piece
        if not piece:
            continue
        matched = [len(w) for w in words if (prompt + text).endswith(w)]
        if matched:
            return text[: max(0, len(text) - max(matched))]
    return text
