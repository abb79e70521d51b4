"""--draft N: tokens drafted from the document and checked in one batch give the text the model
writes one token at a time, in fewer decodes. On the scripted model, whose arithmetic is exact
batched or not; a certain one (greedy text) and an unsure one (sampled text, seed for seed)."""

import pytest

import app as server

SCRIPT = "total = fib + add * Calc - a / b\n"  # each token once (a bigram automaton's script)
# the script is in the prompt: once the model has written its first tokens, the rest is drafted
PREFIX = "def f(a, b):\n    " + SCRIPT + "    return total\n\n\ndef g(a, b):\n    "


def decodes_of(monkeypatch, binding=server.llama_cpp):
    """The sizes of the batches llama_decode gets through a binding: the drafts' decodes come
    through llama_cpp's (app.py's), the others through llama_cpp.llama_cpp's (llama-cpp-python's)."""
    sizes, decode = [], binding.llama_decode
    monkeypatch.setattr(binding, "llama_decode",
                        lambda ctx, batch: sizes.append(batch.n_tokens) or decode(ctx, batch))  # fmt: skip
    return sizes


def texts(make_app, model, draft, seeds, temperature, raw_prompt=None):
    app = make_app(model=model, draft=draft, completion_cache=0, speculate=False, max_tokens=16)[0]
    client = app.test_client()
    out = []
    for seed in seeds:
        body = {"language": "python", "segments": {"prefix": PREFIX, "suffix": "\n"},
                "temperature": temperature, "seed": seed}  # fmt: skip
        if raw_prompt:
            body["debug_options"] = {"raw_prompt": raw_prompt}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.get_data(as_text=True)
        out.append(response.json["choices"][0]["text"])
    return out


def test_drafts_write_the_same_text_in_fewer_decodes(make_app, model_path, monkeypatch):
    sizes = decodes_of(monkeypatch)
    model = model_path(fim_script=SCRIPT)
    plain = texts(make_app, model, 0, [1], 0)
    assert plain == [SCRIPT] and sizes == []
    drafted = texts(make_app, model, 7, [1, 2], 0)  # the second goes on from the first's KV cache
    assert drafted == [SCRIPT, SCRIPT]
    # 12 tokens in 5 decodes, not 11: the prompt's gives the first, 3 the next 3 (4 make a match),
    # one of 8 the next 8 (a draft of 7, all kept), and one more draft, which the end-of-text ends
    assert sizes == [1, 1, 1, 8, 8] * 2, sizes


def test_drafts_sample_what_one_token_at_a_time_samples_seed_for_seed(
    make_app, model_path, monkeypatch
):
    """The model follows its script with a chance of about 1 in 3 a token (logit 2.9 against 0,
    under llama-cpp-python's top-k 40, top-p 0.95, min-p 0.05); the prompt ends as it did before
    the script, which is drafted at once. A drafted token is kept when the model samples it, and
    every token is the model's own draw, so each seed gives the text it gives without drafts."""
    drafts, others = decodes_of(monkeypatch), decodes_of(monkeypatch, server.llama_cpp.llama_cpp)
    model = model_path(fim_script=SCRIPT, logit=2.9)
    turn = "<fim_prefix>def f(a, b):\n    <fim_suffix>\n<fim_middle>"
    raw, seeds = turn + SCRIPT + "\n" + turn, range(300)
    plain = texts(make_app, model, 0, seeds, 1.0, raw)
    one_at_a_time = len(others)  # decodes: each prompt's, then one a token
    others.clear()
    drafted = texts(make_app, model, 4, seeds, 1.0, raw)
    assert plain == drafted
    assert len(set(plain)) > 250  # draws: nearly every seed writes something else
    # drafted tokens kept (each a decode saved) and dropped: both, many times
    kept, tried = one_at_a_time - len(others) - len(drafts), sum(n - 1 for n in drafts)
    assert 30 < kept < tried - 100, (kept, tried)


def test_drafts_on_a_model_that_reads_its_context_write_its_text(make_app, model_path, monkeypatch):
    """Random weights: every token depends on all before it and where it is, so a draft's tokens
    left in the KV cache, or put at the wrong place, change the text. The model falls into
    loops (%%%%...) that drafts take up."""
    drafts = decodes_of(monkeypatch)
    model, out = model_path(weights="random"), {}
    for draft in (0, 4):
        app = make_app(model=model, draft=draft, completion_cache=0, speculate=False, max_tokens=48)
        client, out[draft] = app[0].test_client(), []
        for n in range(30):
            prefix = f"def f{n}(a, b):\n    x = a + {n}\n    return x\n\ndef g(a):\n    "
            body = {"language": "text", "segments": {"prefix": prefix, "suffix": ""},
                    "temperature": 0}  # fmt: skip
            out[draft].append(client.post("/v1/completions", json=body).json["choices"][0]["text"])
    assert out[0] == out[4] and sum(map(len, out[0])) > 2000
    assert sum(n - 1 for n in drafts) > 300 and len(drafts) < 30 * 47 * 0.7  # a third saved


def test_drafts_are_a_local_models(make_app):
    with pytest.raises(SystemExit, match="--draft must be 0 or more, for a local model"):
        make_app(draft=-1)
    with pytest.raises(SystemExit, match="--draft must be 0 or more, for a local model"):
        make_app(model="", backend="http://127.0.0.1:9/v1", backend_model="qwen2.5-coder", draft=3)


def test_a_batch_stopped_midway_leaves_the_kv_cache_as_it_was(make_app, model_path, monkeypatch):
    """abortable() stops a decode (a speculation that a request overtakes) in the middle of a
    draft's batch: llama.cpp drops the batch, and what llm says its KV cache holds (n_tokens,
    input_ids) is what it holds, the tokens before the batch, for the next request to go on."""
    app = make_app(model=model_path(fim_script=SCRIPT), draft=7, completion_cache=0,
                   speculate=False, max_tokens=16)[0]  # fmt: skip
    model = app.extensions["tabbypy"].backend
    llm, batches, decode = model.llm, [], server.llama_cpp.llama_decode
    monkeypatch.setattr(server.llama_cpp, "llama_decode",
                        lambda ctx, batch: batches.append(batch.n_tokens) or decode(ctx, batch))  # fmt: skip

    def stopped_in_a_draft():
        tokens, made = model.prompt(PREFIX, "\n").tokens, []
        server.keep_kv(llm, tokens)
        with pytest.raises(RuntimeError) as error:
            with server.abortable(llm, lambda: bool(batches) and batches[-1] > 1, every=0):
                for token in server.model_tokens(llm, tokens, 0, 1):
                    made.append(token)
        assert server.aborted(error.value)
        return tokens, made

    tokens, made = model.thread.submit(stopped_in_a_draft).result()
    assert batches == [1, 1, 1, 8] and len(made) == 4  # (see the first test)
    held = server.llama_cpp.llama_memory_seq_pos_max(server.llama_cpp.llama_get_memory(llm.ctx), 0)
    assert llm.n_tokens == held + 1 == len(tokens) + 3  # the batch's first token: made, not held
    assert llm.input_ids[: llm.n_tokens].tolist() == tokens + made[:-1]
    body = {"language": "python", "segments": {"prefix": PREFIX, "suffix": "\n"}, "temperature": 0}
    assert app.test_client().post("/v1/completions", json=body).json["choices"][0]["text"] == SCRIPT
