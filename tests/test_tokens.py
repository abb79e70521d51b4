"""The prompt as the model sees it: FIM format found from the model, exact tokens, user text never special."""

import re

import pytest
import tabby_reference as tabby
import tinymodel
from conftest import generate

import app as server

EXPECTED = {  # family -> the template the server must pick (Tabby's registry's, but two)
    "starcoder": "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",
    "codegemma": "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
    "deepseek": "<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>",
    "codellama": "<PRE> {prefix} <SUF>{suffix} <MID>",
    "codestral": "[SUFFIX]{suffix}[PREFIX]{prefix}",
    "custom": "<fim-prefix>{prefix}<fim-suffix>{suffix}<fim-middle>",  # built from llama.cpp's FIM ids
    "plain": "{prefix}",
}
# text that must stay text: every special token of every family the tests build (the custom
# family's <fim-middle> too), and a typed "{suffix}"
SPECIALS = dict.fromkeys(m for f in tinymodel.FAMILIES.values() for m in f["specials"])
HOSTILE = "x = '" + " ".join(SPECIALS) + " {suffix}'\n    "
MARKER = re.compile(r"<[^\s<>{}]+>|\[[A-Z]+\]")  # a special token in a template: <...> or [UPPER]


def markers(family):
    """The special tokens of the family's expected template, in order."""
    return MARKER.findall(EXPECTED[family])


def local(path, template=""):
    """A LocalModel on the tiny model at path, as start-up makes it."""
    config = server.load_config(["--model", path, "--ctx", "512"], environ={})
    return server.LocalModel(dict(config, prompt_template=template))


def test_the_expected_templates_are_tabbys():
    known = set(EXPECTED.values()) - {EXPECTED["custom"], EXPECTED["plain"]}
    assert known == set(tabby.PROMPT_TEMPLATES)


@pytest.mark.parametrize("family", EXPECTED)
def test_the_template_comes_from_the_models_tokens(model_path, family):
    fmt = local(model_path(family)).format
    assert fmt.template == EXPECTED[family]
    assert fmt.fim == (family != "plain")


@pytest.mark.parametrize("family", [f for f in EXPECTED if f != "plain"])
def test_prompt_tokens_equal_the_templates(model_path, family):
    model = local(model_path(family))
    llm = model.llm
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    tokens, text, size = model.prompt(prefix, suffix)
    assert size == len(tokens)
    # with no marker in the user text, tokenizing the whole string with special parsing on agrees
    assert tokens == llm.tokenize(text.encode(), add_bos=False, special=True)
    assert text == EXPECTED[family].replace("{prefix}", prefix).replace("{suffix}", suffix)
    ids = tinymodel.FAMILIES[family]["specials"]
    assert [t for t in tokens if t < len(ids)] == [ids.index(m) for m in markers(family)]


@pytest.mark.parametrize(
    "family, special_type",
    [(f, 3) for f in EXPECTED] + [("deepseek", 4), ("starcoder", 4), ("custom", 4)],
)
def test_user_text_never_becomes_a_special_token(model_path, family, special_type):
    # special_type 4: markers stored as USER_DEFINED tokens, which llama.cpp matches even with special parsing off
    model = local(model_path(family, special_type=special_type))
    llm = model.llm
    tokens, text, _ = model.prompt(HOSTILE, HOSTILE)
    ids = tinymodel.FAMILIES[family]["specials"]
    assert all(m in HOSTILE for m in ids)  # the family's own markers are in the user's text
    # special tokens only where the template puts them
    assert [t for t in tokens if t < len(ids)] == [ids.index(m) for m in markers(family)]
    assert (
        llm.detokenize(tokens, special=True).decode() == text
    )  # and nothing of the user's text is lost


def test_a_prompt_template_override_is_used(model_path):
    model = local(model_path("starcoder"), "<fim_suffix>{suffix}<fim_prefix>{prefix}<fim_middle>")
    tokens, text, _ = model.prompt("a\n", "b")
    assert text == "<fim_suffix>b<fim_prefix>a\n<fim_middle>" and tokens[0] == 3 and tokens[-1] == 2


@pytest.mark.parametrize("family", ["starcoder", "codellama", "codestral", "plain"])
def test_code_on_the_cursor_line_comes_last(model_path, family):
    model = local(model_path(family))
    tokens, text, _ = model.prompt("def f(a, b):\n    return a", "\n")
    assert text.endswith("    return a")  # so the next keystroke only adds tokens at the end
    longer = model.prompt("def f(a, b):\n    return a +", "\n").tokens
    assert longer[: len(tokens) - 1] == tokens[:-1]
    if family == "starcoder":
        assert text == "<fim_prefix>def f(a, b):\n<fim_suffix>\n<fim_middle>    return a"


def test_a_fim_template_on_a_model_without_fim_tokens_stops_start_up(model_path):
    with pytest.raises(SystemExit, match="'<fim_prefix>' is not a special token of this model"):
        local(model_path("plain"), EXPECTED["starcoder"])


def test_generate_follows_the_script_and_stops(model_path):
    model = local(model_path("starcoder"))
    llm = model.llm
    tokens, text, _ = model.prompt("def f(a, b):\n    ", "\n")
    # no stop words: the script runs to its end-of-text token (15 tokens and end-of-text)
    assert generate(llm, tokens, 64) == (tinymodel.FIM_SCRIPT, 15, "eos")
    # where end_of says, the text ends
    stops = server.stop_words("python")
    out, n, reason = generate(
        llm, tokens, 64, end_of=lambda t: server.find_stop(t, stops, text[-8:])
    )
    assert (out, n, reason) == ("total = a + b\n    return total", 9, "stop")
    # max_tokens counts tokens: "total", " =", " a"
    assert generate(llm, tokens, 3) == ("total = a", 3, "length")
    # should_stop ends it with nothing, after the first token at the latest
    assert generate(llm, tokens, 64, should_stop=lambda: True) == ("", 0, "cancelled")
