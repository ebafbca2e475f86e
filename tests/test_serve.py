"""The server, over real HTTP on 127.0.0.1 with a trained tiny retrieval run and its real index: the official
``openai`` client works (plain and streamed), citations point at the datastore's real text, streaming and
batching do not change what is generated, errors are 4xx in OpenAI's shape, a full queue answers 429, and a
client that leaves cancels its generation."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from test_retrieval_model import repeated_text_store

from knnformer.config import load_config
from knnformer.serve.background import BackgroundServer
from knnformer.serve.server import open_service
from knnformer.train.trainer import train


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """(run folder, datastore) of a tiny retrieval run over text whose lines repeat across documents."""
    tmp = tmp_path_factory.mktemp("serve")
    store = repeated_text_store(tmp)
    config = load_config("tiny", ["model.context=64", "train.steps=30", "train.eval_interval=15",
                                  "retrieval.enabled=true"])
    config.model.vocab_size = 256
    train(tmp / "run", store, config)
    return tmp / "run", store


@pytest.fixture(scope="module")
def server(served_run):
    with BackgroundServer(open_service(served_run[0], max_batch=4, max_queue=8)) as url:
        yield url


def document_texts(store) -> dict[str, bytes]:
    return {doc_id: store.tokenizer.decode(store.tokens[row["start"] : row["start"] + row["length"]]).encode()
            for row, doc_id in zip(store.docs, store.doc_ids)}


def check_citations(citations: list[dict], text: str, store) -> None:
    """Every source is real train text at its stated byte span; spans cover the completion in order."""
    docs = document_texts(store)
    assert citations
    for g in citations:
        assert 0 <= g["span"][0] <= g["span"][1] <= len(text)
        assert g["read_by_model"] is True and len(g["query"]) == 16
        for s in g["sources"]:
            a, b = s["byte_span"]
            assert s["split"] == "train" and docs[s["doc_id"]][a:b] == s["text"].encode()
            assert docs[s["doc_id"]][b:].startswith(s["continuation"].encode())  # what the model read after it
    assert [g["span"][0] for g in citations] == sorted(g["span"][0] for g in citations)


def prompt_of(store, n: int = 40) -> str:
    return store.tokenizer.decode(store.split_tokens("valid")[:n])


def test_openai_client_completes_and_cites_real_sources(server, served_run):
    from openai import OpenAI

    _, store = served_run
    client = OpenAI(base_url=server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["run"]
    prompt = prompt_of(store)
    out = client.completions.create(model="run", prompt=prompt, max_tokens=40, temperature=0.7, seed=3)
    text = out.choices[0].text
    assert out.usage.completion_tokens == 40 and out.choices[0].finish_reason == "length"
    check_citations(out.model_extra["citations"], text, store)
    # the prompt's chunk 1 is a line also found in train: the neighbours it retrieved include that exact text
    stream = client.completions.create(model="run", prompt=prompt, max_tokens=40, temperature=0.7, seed=3,
                                       stream=True)
    pieces, streamed_groups, final = [], [], None
    for chunk in stream:
        pieces.append(chunk.choices[0].text)
        extra = chunk.model_extra or {}
        if chunk.choices[0].finish_reason:
            final = extra["citations"]
        elif extra.get("citations"):
            streamed_groups += extra["citations"]
    assert "".join(pieces) == text  # streaming changes nothing: same seed, same text
    assert final == out.model_extra["citations"]
    assert [g["sources"] for g in streamed_groups] == [g["sources"] for g in final]


def test_batching_does_not_change_what_a_request_generates(server, served_run):
    """Greedy completions of different prompts, run alone and then all at once (batched in one step), agree."""
    import concurrent.futures

    _, store = served_run
    tokens = store.split_tokens("valid")
    prompts = [store.tokenizer.decode(tokens[i : i + 20 + 7 * i]) for i in range(4)]

    def complete(p):
        r = httpx.post(server + "/v1/completions", json={"prompt": p, "max_tokens": 30, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    alone = [complete(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(complete, prompts))
    assert together == alone


def test_retrieval_off_generates_without_the_neighbours(server, served_run):
    _, store = served_run
    body = {"prompt": prompt_of(store), "max_tokens": 30, "temperature": 0}
    on = httpx.post(server + "/v1/completions", json=body, timeout=60).json()
    off = httpx.post(server + "/v1/completions", json={**body, "retrieval": False}, timeout=60).json()
    assert on["retrieval"] is True and off["retrieval"] is False
    assert all(not g["read_by_model"] for g in off["citations"])  # still searched, shown as not read


def test_bad_requests_get_openai_shaped_4xx(server):
    def post(body, **kw):
        return httpx.post(server + "/v1/completions", timeout=30, **({"json": body} | kw))

    cases = [
        (post(None, content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
        (post({"prompt": "a", "max_tokens": "5"}), 400, "max_tokens"),
        (post({"prompt": "a", "max_tokens": 5.5}), 400, "max_tokens"),
        (post({"prompt": "a", "frobnicate": 1}), 400, "unknown field"),
        (post({"prompt": "a", "temperature": -1}), 400, "temperature"),
        (post({"prompt": "a", "max_tokens": 10**6}), 400, "max_tokens"),
        (post({"prompt": ["a", "b"]}), 400, "one prompt"),
        (post([1, 2]), 400, "JSON object"),
        (post({"prompt": "a" * (2 << 20)}), 413, "bytes"),
        (httpx.post(server + "/v1/chat/completions", json={"messages": []}), 400, "base language model"),
        (httpx.get(server + "/v1/nothing"), 404, "Not Found"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (response.status_code, response.text)
        error = response.json()["error"]
        assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_a_long_prompt_is_cut_from_the_left_and_the_response_says_so(server):
    r = httpx.post(server + "/v1/completions", json={"prompt": "abcdefgh " * 20, "max_tokens": 5}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["prompt_tokens_dropped"] == 180 - 64 and "cut" in body["warning"]
    assert body["usage"]["prompt_tokens"] == 64


def test_retrieve_models_health_and_metrics(server, served_run):
    _, store = served_run
    text = prompt_of(store)[16:32]
    r = httpx.post(server + "/v1/retrieve", json={"text": text, "k": 3}).json()
    assert len(r["data"]) == 3 and r["data"][0]["text"] == text  # the line occurs in train
    docs = document_texts(store)
    for s in r["data"]:
        assert docs[s["doc_id"]][s["byte_span"][0] : s["byte_span"][1]] == s["text"].encode()
    assert httpx.post(server + "/v1/retrieve", json={"text": ""}).status_code == 400
    assert httpx.get(server + "/healthz").json() == {"status": "ok"}
    info = httpx.get(server + "/v1/info").json()
    assert info["retrieval"] and info["evaluation"]["valid_bits_per_byte"] > 0
    metrics = httpx.get(server + "/metrics").text
    for series in ("knnformer_tokens_generated_total", "knnformer_time_to_first_token_seconds_bucket",
                   "knnformer_inter_token_seconds_count", "knnformer_retrieval_seconds_sum",
                   "knnformer_queue_length", 'knnformer_requests_total{path="/v1/completions",status="200"}'):
        assert series in metrics, series


def test_a_full_queue_answers_429_and_a_client_that_leaves_cancels(served_run):
    with BackgroundServer(open_service(served_run[0], max_batch=1, max_queue=1)) as url:
        body = {"prompt": "abc", "max_tokens": 1000, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json=body) as first:
            lines = first.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # generating: the one row is taken
            with httpx.Client(timeout=60) as c2, c2.stream("POST", url + "/v1/completions", json=body) as second:
                time.sleep(0.3)  # queued behind the first
                third = httpx.post(url + "/v1/completions", json=body, timeout=30)
                assert third.status_code == 429 and third.headers["retry-after"] == "1"
                assert third.json()["error"]["type"] == "rate_limit_error"
                first.close()  # the first client leaves: its row is freed and the second starts
                got = next(line for line in second.iter_lines() if line.startswith("data:"))
                assert json.loads(got[5:])["choices"][0]["text"] is not None
        deadline = time.time() + 20
        while time.time() < deadline:
            metrics = httpx.get(url + "/metrics").text
            if "knnformer_requests_cancelled_total 2" in metrics and "knnformer_active_rows 0" in metrics:
                break
            time.sleep(0.1)
        assert "knnformer_requests_cancelled_total 2" in metrics and "knnformer_requests_rejected_total 1" in metrics
        assert "knnformer_active_rows 0" in metrics


def test_the_server_generates_what_the_generator_does_past_the_context(server, served_run):
    """Greedy text from the batching engine equals RetrievingGenerator.sample's (knnformer generate), over more
    tokens than the context holds, so both rebuild their window the same way."""
    from knnformer.run.record import load_run
    from knnformer.serve.generate import RetrievingGenerator, stream_text

    run, store = served_run
    prompt = prompt_of(store)
    model, record, _ = load_run(run)
    gen = RetrievingGenerator.for_run(model, store, run, record)
    ids = list(gen.sample(store.tokenizer.encode(prompt), 100, temperature=0))
    expected = "".join(stream_text(store.tokenizer, iter(ids)))
    r = httpx.post(server + "/v1/completions", json={"prompt": prompt, "max_tokens": 100, "temperature": 0},
                   timeout=60).json()
    assert r["choices"][0]["text"] == expected and r["usage"]["completion_tokens"] == 100


def test_stop_sequences_end_the_text_before_them_streamed_or_not(server, served_run):
    _, store = served_run
    body = {"prompt": prompt_of(store), "max_tokens": 60, "temperature": 0}
    full = httpx.post(server + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    stop = full[20:22]
    want = full[: full.index(stop)]
    plain = httpx.post(server + "/v1/completions", json={**body, "stop": [stop, "\x00never"]}, timeout=60).json()
    assert plain["choices"][0]["text"] == want and plain["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stop": stop, "stream": True}) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_cli_warns_when_bound_beyond_this_machine(served_run):
    import subprocess
    import sys

    from knnformer.serve.background import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "knnformer.cli", "serve", str(served_run[0]), "--host",
                             "127.0.0.2", "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.2:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("knnformer serve did not start")
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert "warning: serving on 127.0.0.2" in err and "no authentication" in err


def test_the_server_searches_bm25_with_numba_and_the_same_scores(tmp_path):
    import numpy as np
    from conftest import make_datastore

    from knnformer.retrieval.build import index_datastore
    from knnformer.retrieval.live import open_retriever
    from knnformer.serve.server import fast_bm25

    pytest.importorskip("numba")
    store = make_datastore(tmp_path)
    index_datastore(store.path, embedder="bm25", k=2, chunk_size=16)
    plain, fast = open_retriever(store), open_retriever(store)
    fast_bm25(fast)
    assert fast.index.backend == "numba" and plain.index.backend is None
    texts = ["the corpus is its memory", "every chunk it retrieves", "café naïve"]
    a, b = plain.search(texts, 4), fast.search(texts, 4)
    assert np.allclose(a.D, b.D)


def test_a_plain_request_whose_client_leaves_is_cancelled(served_run):
    # A request far longer than the server's disconnect poll (0.5 s): with 1,000 tokens a quiet machine finished
    # the generation before the server saw the client leave, and the test failed by racing it.
    with BackgroundServer(open_service(served_run[0], max_batch=2, max_tokens=100_000)) as server:
        def cancelled() -> float:
            line = next((x for x in httpx.get(server + "/metrics").text.splitlines()
                         if x.startswith("knnformer_requests_cancelled_total ")), "x 0")
            return float(line.split()[1])

        before = cancelled()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server + "/v1/completions", json={"prompt": "abc", "max_tokens": 100_000}, timeout=0.5)
        deadline = time.time() + 20
        while cancelled() == before and time.time() < deadline:
            time.sleep(0.1)
        assert cancelled() == before + 1


def test_a_plain_lm_is_served_with_the_chunks_closest_to_its_text(tmp_path):
    """A run without retrieval generates as a plain LM; its citations are searched only (read_by_model false)."""
    store = repeated_text_store(tmp_path)
    config = load_config("tiny", ["model.context=64", "train.steps=3", "train.eval_interval=0"])
    config.model.vocab_size = 256
    train(tmp_path / "plain", store, config)
    with BackgroundServer(open_service(tmp_path / "plain", max_batch=2)) as url:
        info = httpx.get(url + "/v1/info").json()
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt_of(store), "max_tokens": 40, "seed": 0},
                       timeout=60).json()
    assert info["retrieval"] is False and r["retrieval"] is False and r["usage"]["completion_tokens"] == 40
    assert r["citations"] and all(not g["read_by_model"] for g in r["citations"])
    docs = document_texts(store)
    for s in (s for g in r["citations"] for s in g["sources"]):
        assert docs[s["doc_id"]][s["byte_span"][0] : s["byte_span"][1]] == s["text"].encode()


@pytest.fixture(scope="module")
def lively_run(tmp_path_factory):
    """A retrieval run whose every token depends on its whole context (weights initialised wide, 2 steps): the
    trained tiny run of ``served_run`` writes the same greedy text whatever the prompt, which checks nothing."""
    tmp = tmp_path_factory.mktemp("lively")
    store = repeated_text_store(tmp)
    config = load_config("tiny", ["model.context=64", "model.init_std=0.5", "train.steps=2",
                                  "train.eval_interval=0", "retrieval.enabled=true"])
    config.model.vocab_size = 256
    train(tmp / "run", store, config)
    return tmp / "run", store


def test_batched_rows_generate_what_each_prompt_does_alone(lively_run):
    """Prompts of different lengths admitted together (rows at different positions, sampled by pick_tokens in
    one step) or arriving one by one while others decode give each the greedy text it gets alone, past a
    chunk boundary and its retrieval, on a run whose text depends on its prompt."""
    import threading

    from knnformer.serve.batcher import Request

    run, store = lively_run
    tokens = store.split_tokens("valid")
    prompts = [[int(t) for t in tokens[i : i + 5 + 9 * i]] for i in range(6)]

    def complete(service, group: list[list[int]], stagger: float = 0.0) -> list[str]:
        texts, done, errors = [""] * len(group), threading.Semaphore(0), []
        for i, p in enumerate(group):
            def emit(ev, i=i):
                texts[i] += ev.get("text", "")
                if "error" in ev:
                    errors.append(ev["error"])
                if "done" in ev or "error" in ev:
                    done.release()
            service.engine.submit(Request(p, 40, emit, 0.0))
            time.sleep(stagger)
        for _ in group:
            assert done.acquire(timeout=60)
        assert not errors
        return texts

    service = open_service(run, max_batch=4)
    try:
        alone = [complete(service, [p])[0] for p in prompts]
        assert len(set(alone)) == len(alone)  # each prompt gives its own text: the check can fail
        assert complete(service, prompts) == alone
        assert complete(service, prompts, stagger=0.005) == alone
    finally:
        service.close()
