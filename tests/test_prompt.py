"""Prompt building and stop words: pure functions, no model."""

import re

import pytest
import tabby_reference as tabby

import app as server


@pytest.mark.parametrize(
    "tail, text, expected",
    [
        ("<fim_middle>", "return x\n\ndef", 8),  # the blank line, inside the generated text
        ("<fim_middle>", "return x", None),  # nothing to stop at yet
        ("def f():\n", "\n", 0),  # "\n\n" starts in the prompt's last character
        ("def f():\n\n", "x", None),  # a stop word wholly inside the prompt does not count
        ("", "x = 1\n# note\nclass A", 5),  # the earliest of several wins
    ],
)
def test_find_stop(tail, text, expected):
    assert server.find_stop(text, server.stop_words("python"), tail) == expected


@pytest.mark.parametrize(
    "prefix, suffix, language, text, kept",
    [
        # an empty line in a block: the block goes on; a dedent ends it, and in Python a line
        # after a blank line is not kept, so that its first character settles it
        (
            "def add(a, b):\n    ",
            "\n",
            "python",
            "return a + b\n\n\ndef sub():",
            "return a + b\n\n\nd",
        ),
        ("def f(a):\n    ", "\n", "python", "if a:\n        b()\n    c()", None),  # in scope
        ("def f(a):\n    ", "\n", "python", "x = 1\n   ", None),  # the new line's indent is unknown
        # the first line out is kept as the closing line: once whole, and the next has begun
        (
            "def f(a):\n    ",
            "\n",
            "python",
            "x = a\n    return x\nprint(x)\nf",
            "x = a\n    return x\nprint(x)\nf",
        ),
        (
            "function f() {\n  ",
            "\n}\n",
            "javascript",
            "return 1;\n}\n\nfunction g",
            "return 1;\n}\n\n",
        ),
        # code before the cursor: the lines as far in as the cursor line's are cut ...
        ("def f(a, b):\n    result = ", "\n", "python", "a + b\n    return result", "a + b\n    r"),
        # ... unless the completion starts on the next line, or the line opens a block (issue 15)
        ("def f(a, b):\n    x = a + b", "\n", "python", "\n    y = x * 2\n    return y", None),
        (
            "def f(a, b):\n    t = g(a, ",
            "\n",
            "python",
            "b,\n          c)\n    return t\nx",
            "b,\n          c)\n    return t\nx",
        ),
        (
            "def f(a, b):\n    if a ",
            "\n",
            "python",
            "> b:\n        return a\n    return b\nx",
            "> b:\n        return a\n    return b\nx",
        ),
        # a dedent followed by a deeper line (else:) goes on
        (
            "def f(a):\n    if a:\n        ",
            "\n",
            "python",
            "return 1\n    else:\n        return 2\n    return 3",
            None,
        ),
        (
            "def f(a):\n    if a:\n        ",
            "\n",
            "python",
            "return 1\n    else:\n        return 2\n    return 3\nz",
            "return 1\n    else:\n        return 2\n    return 3\nz",
        ),
        ("    print(", ")", "python", "\n        a,\n        b", None),  # closing characters only
        ("x = ", "", "python", "1", None),
        ("", "", "python", "a\nb\nc", None),  # a blank prefix: nothing to measure against
    ],
)
def test_generation_stops_where_the_editor_is_sure_to_cut(prefix, suffix, language, text, kept):
    cursor = server.cursor_of(prefix, suffix, language)
    ended = [k for k in range(len(text) + 1) if server.scope_ended(text[:k], cursor)]
    assert (text[: ended[0]] if ended else None) == kept


@pytest.mark.parametrize(
    "text, end",
    [
        ("a, 2)", None),
        ("a, 2)\n    x = 1", len("a, 2)\n")),  # the newline too: the agent trims ", 2)" only then
        ("a, 2)\n\nfoo", len("a, 2)")),  # a stop word first
        ("a, 2)\n", None),  # a stop word may begin at the newline: "\n\n", "\ndef", ...
        ("a, 2)\n    ", len("a, 2)\n")),  # no stop word is "\n    "
        ("a, 2)\nde", None),  # "\ndef" may come
        ("a, 2)\ndel x", len("a, 2)\n")),
        ("a, 2)\ndef g():", len("a, 2)")),  # Tabby's stop word: its answer is the first line
    ],
)
def test_text_after_the_cursor_ends_the_completion_after_its_first_line(text, end):
    cursor = server.cursor_of("def f(a):\n    compute(", ", 2)\n", "python")
    assert cursor.fill_in_line
    assert server.text_end(text, server.stop_words("python"), "", cursor) == end


def test_the_cursor_holds_what_the_agents_cut_depends_on():
    cursor = server.cursor_of(
        "def f(a):\n    if a:\n        x = 1\n\n    ", "  \n\n  return 2\n", "python"
    )
    assert cursor == server.Cursor("    ", 8, 2, False, True)
    assert server.cursor_of("f(", ')"]} \nx', "go").fill_in_line is False
    assert server.cursor_of("f(", ", 2)\nx", "go").fill_in_line is True
    assert server.cursor_of("\n\n", "", "go") == server.Cursor("", None, None, False, False)


def test_pick_snippets_in_priority_order_within_budget():
    segments = {
        "relevant_snippets_from_recently_opened_files": [
            {"filepath": "c.py", "body": "c = 3", "score": 0.2}
        ],
        "relevant_snippets_from_changed_files": [
            {"filepath": "b.py", "body": "b" * 700, "score": 0.9},
            {"filepath": "b2.py", "body": "b2 = 2", "score": 0.8},
        ],
        "declarations": [{"filepath": "a.py", "body": "a" * 100}],
    }
    picked = server.pick_snippets(segments)
    # 100 + 700 > 768 ends the changed-files list at its first item; the next list still gets its turn
    assert [s["filepath"] for s in picked] == ["a.py", "c.py"]
    assert picked[0]["score"] == 1.0 and picked[1]["score"] == 0.2


def test_snippet_budget_counts_bytes_like_tabby():
    body = "é" * 300  # 600 bytes, 300 characters
    picked = server.pick_snippets(
        {"declarations": [{"filepath": "a", "body": body}, {"filepath": "b", "body": body}]}
    )
    assert [s["filepath"] for s in picked] == ["a"]


def test_build_prefix_matches_tabbys_own_test():
    # TabbyML/tabby completion_prompt.rs, test_build_prefix_readable
    snippets = [
        {"filepath": f"a{i}.py", "body": f"res_{i} = invoke_function_{i}(n)", "score": 1.0}
        for i in (1, 2, 3)
    ]
    prefix = "'''\nUse some invoke_function to do some job.\n'''\ndef this_is_prefix():\n"
    assert server.build_prefix("python", prefix, snippets) == (
        "# Path: a1.py\n# res_1 = invoke_function_1(n)\n#\n"
        "# Path: a2.py\n# res_2 = invoke_function_2(n)\n#\n"
        "# Path: a3.py\n# res_3 = invoke_function_3(n)\n" + prefix
    )


@pytest.mark.parametrize("language", ["css", "sql", "json", "unknown"])
def test_build_prefix_leaves_out_snippets_without_a_line_comment(language):
    assert server.build_prefix(language, "x", [{"filepath": "a", "body": "b", "score": 1.0}]) == "x"


def fill(template, prefix, suffix):
    """The template filled in one pass, so a "{suffix}" typed by the user stays as it is."""
    return re.sub(
        r"\{prefix\}|\{suffix\}", lambda m: prefix if m.group() == "{prefix}" else suffix, template
    )


MARKER = r"<[^\s<>{}]+>|\[[A-Z]+\]"  # a special token in a template: <...> or [UPPER]


@pytest.mark.parametrize("template", list(tabby.PROMPT_TEMPLATES) + ["{prefix}"])
def test_fill_template_gives_tabbys_prompt_string(template):
    """Every prompt template of Tabby's registry, filled as Tabby fills it."""
    specials = {m: 100 + i for i, m in enumerate(re.findall(MARKER, template))}
    parts = server.template_format(template, specials).parts
    prefix, suffix = "def f(x):\n    {suffix} <fim_middle>", "\n    return y\n"
    pieces, text = server.fill_template(parts, specials, prefix, suffix)
    assert text == fill(template, prefix, suffix)
    # the template's markers become ids in order; all else, user text that looks like a marker too, stays text
    assert [p for p in pieces if isinstance(p, int)] == list(specials.values())
    assert "".join(p for p in pieces if isinstance(p, str)) == fill(
        re.sub(MARKER, "", template), prefix, suffix
    )


def test_fill_template_joins_template_text_with_user_text():
    specials = {"<PRE>": 1, "<SUF>": 2, "<MID>": 3}
    parts = server.template_format("<PRE> {prefix} <SUF>{suffix} <MID>", specials).parts
    assert server.fill_template(parts, specials, "a", "b")[0] == [1, " a ", 2, "b ", 3]


def test_keep_lines_keeps_whole_lines_from_the_right_end():
    text = "".join(f"line{i}\n" for i in range(10))
    fits = lambda t: len(t) <= 20  # noqa: E731
    assert server.keep_lines(text, fits, keep_end=True) == "line7\nline8\nline9\n"
    assert server.keep_lines(text, fits, keep_end=False) == "line0\nline1\nline2\n"
    assert server.keep_lines("short", fits, keep_end=True) == "short"


def test_keep_lines_cuts_inside_a_line_only_when_one_line_is_too_long():
    line = "x" * 50 + "END"
    assert server.keep_lines("a\n" + line, lambda t: len(t) <= 10, keep_end=True) == "x" * 7 + "END"
    assert (
        server.keep_lines("START" + "x" * 50 + "\nb", lambda t: len(t) <= 10, keep_end=False)
        == "START" + "x" * 5
    )


def test_fit_prompt_keeps_the_text_nearest_the_cursor():
    prefix = "".join(f"p{i}\n" for i in range(100))
    suffix = "".join(f"s{i}\n" for i in range(100))
    count = lambda p, s: len(p) + len(s) + 3  # noqa: E731
    p, s = server.fit_prompt(prefix, suffix, count, 200)
    assert count(p, s) <= 200
    assert prefix.endswith(p) and suffix.startswith(s) and p.startswith("p") and s.endswith("\n")
    assert len(s) >= 200 // 4 - 4 and len(p) > len(
        s
    )  # the suffix gets its quarter, the prefix the rest


def test_fit_prompt_gives_a_short_prefix_room_to_a_long_suffix():
    suffix = "".join(f"s{i}\n" for i in range(100))
    p, s = server.fit_prompt("x = ", suffix, lambda p, s: len(p) + len(s), 200)
    assert p == "x = " and len(s) > 190


def test_clean_replaces_lone_surrogates():
    assert server.clean("a\ud800b") == "a\ufffdb"
    assert server.clean("ok 😀") == "ok 😀"


def test_an_accepted_completion_moves_the_agents_window_of_lines():
    twenty = "".join(f"x{i}\n" for i in range(19)) + "    y = "  # 20 lines, the cursor's too
    assert server.accepted_prefix(twenty, "1\n    z = 2") == twenty[3:] + "1\n    z = 2"
    assert server.accepted_prefix("a\nb", "c\nd") == "a\nbc\nd"  # the start of a file
    longer = "".join(f"x{i}\n" for i in range(30))  # another client's: all of it
    assert server.accepted_prefix(longer, "z\n") == longer + "z\n"
