"""``mor-serve``: the real HTTP server (uvicorn on 127.0.0.1, a free port, in a thread) over a tiny MoR export
with random weights and a tiny byte-level BPE tokenizer, driven by ``requests``. Greedy completions equal
``generate()``'s, streamed chunks add up to the non-streamed text, bad requests get a 400 that names the
field, and the server keeps serving after them; in the engine, requests join a running batch and a full KV
pool fails only the requests that needed the blocks.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mor_megatron.cli import serve
from mor_megatron.inference.engine import Completion, DepthWiseEngine, Request, SequenceWiseEngine, Ticket
from mor_megatron.inference.hf import AUTO_MAP, copy_modeling_files
from mor_megatron.inference.hf.configuration_mor import MoRConfig
from mor_megatron.inference.hf.modeling_mor import MoRForCausalLM
from mor_megatron.inference.kv_buffers import KVPoolExhausted
from tests.bpe import byte_level_bpe

MAX_LEN = 32
PROMPTS = ["def main(", "import os\n", "hello world", "x = 1"]
TEXTS = ["def main():\n    return 0\n", "import os\nimport sys\n", "hello world, hello there",
         "x = 1\ny = 2\n"]


def _tiny_mor(vocab_size: int) -> MoRForCausalLM:
    config = MoRConfig(num_prefix_layers=1, num_shared_layers=2, num_suffix_layers=1, num_recursions=3,
                       routing="expert_choice", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, eos_token_id=0,
                       pad_token_id=0, max_position_embeddings=64)
    torch.manual_seed(0)
    model = MoRForCausalLM(config).eval()
    with torch.no_grad():
        model.model.router.weight.normal_(0.0, 1.0)  # depths vary
    return model


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    folder = byte_level_bpe(TEXTS * 4, tmp_path_factory.mktemp("serve") / "mor", vocab_size=300)
    model = _tiny_mor(len(AutoTokenizer.from_pretrained(folder)))
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(folder)
    copy_modeling_files(folder)
    return folder, model


@pytest.fixture(scope="module")
def url(export):
    import uvicorn

    from mor_megatron.inference.server import create_app

    server = serve.load_server(export[0], slots=3, max_len=MAX_LEN, kv_blocks=None, block_size=4,
                               dtype="float32", model_name="tiny")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert http.started, "uvicorn did not start within 30 s"
        yield f"http://127.0.0.1:{port}"
    finally:
        http.should_exit = True
        thread.join(timeout=15)
        assert not server.alive, "the engine thread outlived the server"


def _expected(export, prompt: str, max_tokens: int) -> str:
    folder, model = export
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=0,
                             pad_token_id=0)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def _complete(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json={"model": "tiny", **body}, timeout=60)


def test_concurrent_greedy_completions_equal_generate(url, export):
    def ask(prompt: str) -> dict:
        response = _complete(url, prompt=prompt, max_tokens=12, temperature=0)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(ask, PROMPTS))
    texts = [answer["choices"][0]["text"] for answer in answers]
    assert texts == [_expected(export, prompt, 12) for prompt in PROMPTS]
    assert len(set(texts)) > 1 and all(texts), f"degenerate generations: {texts}"
    for answer in answers:
        assert answer["object"] == "text_completion" and answer["model"] == "tiny"
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        usage = answer["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 1 <= usage["completion_tokens"] <= 12


def test_a_list_prompt_gets_one_choice_per_prompt(url, export):
    response = _complete(url, prompt=PROMPTS[:2], max_tokens=5, temperature=0)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["text"] for c in choices] == [_expected(export, p, 5) for p in PROMPTS[:2]]


def test_streamed_chunks_add_up_to_the_completion(url):
    body = dict(prompt=PROMPTS[0], max_tokens=16, temperature=0.8, top_k=20, seed=7)
    whole = _complete(url, **body).json()["choices"][0]
    with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True,
                       timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: "))["choices"][0] for line in lines[:-1]]
    assert len(chunks) > 2, "nothing was streamed before the end"
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]
    assert all(c["finish_reason"] is None for c in chunks[:-1])


def _streamed_text(url: str, **body) -> str:
    with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True,
                       timeout=60) as response:
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    return "".join(json.loads(line.removeprefix("data: "))["choices"][0]["text"] for line in lines[:-1])


def test_a_stop_string_cuts_the_text(url, export):
    full = _expected(export, PROMPTS[0], 12)
    start = next(i for i in range(1, len(full) - 1) if full[i:i + 2].isalnum())
    body = dict(prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=["@@", full[start:start + 2]])
    answer = _complete(url, **body).json()["choices"][0]
    assert answer == {**answer, "text": full[:start], "finish_reason": "stop"}
    assert _streamed_text(url, **body) == full[:start]


def test_bad_requests_get_400_naming_the_field_and_the_server_goes_on(url, export):
    malformed = requests.post(f"{url}/v1/completions", data=b"{not json", timeout=10,
                              headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    for body, field in [(dict(prompt="x", max_tokens="ten"), "max_tokens"), (dict(max_tokens=3), "prompt"),
                        (dict(prompt="x", n=2), "n"), (dict(prompt="x", temperature=-1), "temperature"),
                        (dict(prompt="x", stop=[3]), "stop")]:
        response = _complete(url, **body)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert error["param"] == field and f"{field}" in error["message"], error
    too_long = _complete(url, prompt="hello world " * 10, max_tokens=MAX_LEN)
    assert too_long.status_code == 400
    assert f"limit of {MAX_LEN + 1}" in too_long.json()["error"]["message"]
    assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    assert [m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]] == ["tiny"]
    after = _complete(url, prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == _expected(export, PROMPTS[1], 6)


def _serving(engine: DepthWiseEngine):
    stop = threading.Event()
    thread = threading.Thread(target=engine.serve, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def _submit(engine: DepthWiseEngine, request: Request) -> tuple[threading.Event, list]:
    done, outcome = threading.Event(), []
    engine.submit(Ticket(request, on_token=outcome.append,
                         on_finish=lambda result: (outcome.append(result), done.set())))
    return done, outcome


def test_submitted_requests_stream_tokens_and_a_full_pool_fails_only_its_request(export):
    model = export[1]
    requests_ = [Request(prompt=tuple(range(5, 5 + n)), max_new_tokens=m)
                 for n, m in [(3, 8), (9, 6), (2, 7)]]
    roomy = DepthWiseEngine(model, num_slots=3, max_batch=2, max_len=64, eos_token_id=None, block_size=4)
    expected = roomy.run(requests_).completions
    # Room for the three requests resident together, whenever each arrives.
    blocks = sum(c.kv_bytes for c in expected) // roomy.buffers.pool.block_bytes
    engine = DepthWiseEngine(model, num_slots=3, max_batch=2, max_len=64, eos_token_id=None, block_size=4,
                             kv_blocks=blocks)
    stop, thread = _serving(engine)
    try:
        # 64 prompt tokens fill 16 blocks in each of the prefix, suffix and two depth-0 shared streams at
        # least: more than the pool, so this request's prefill fails.
        assert blocks < 4 * 16
        big_done, big = _submit(engine, Request(prompt=tuple([7] * 64), max_new_tokens=1))
        waits = [_submit(engine, request) for request in requests_]
        assert big_done.wait(30) and isinstance(big[-1], KVPoolExhausted)
        for (done, outcome), completion in zip(waits, expected):
            assert done.wait(30), "a request never finished"
            assert isinstance(outcome[-1], Completion) and outcome[-1].tokens == completion.tokens
            assert outcome[:-1] == completion.tokens, "tokens were not streamed one by one"
        assert engine.buffers.pool.used_blocks == 0
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_an_engine_error_ends_every_waiting_request_and_the_loop(export, monkeypatch):
    engine = DepthWiseEngine(export[1], num_slots=1, max_batch=1, max_len=MAX_LEN, eos_token_id=None)

    def broken(slots: list[int]) -> None:
        raise RuntimeError("broken step")

    monkeypatch.setattr(engine, "_block_step", broken)
    waits = [_submit(engine, Request(prompt=(5, 6), max_new_tokens=4)) for _ in range(2)]  # resident, queued
    stop = threading.Event()
    with pytest.raises(RuntimeError, match="broken step"):
        engine.serve(stop)
    for done, outcome in waits:
        assert done.is_set() and isinstance(outcome[-1], RuntimeError)
    assert engine.buffers.pool.used_blocks == 0


def test_a_vanilla_export_gets_the_sequence_wise_engine(tmp_path):
    folder = byte_level_bpe(TEXTS, tmp_path / "llama", vocab_size=280)
    config = LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(folder)), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, initializer_range=0.2)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).eval()
    llama.save_pretrained(folder)
    server = serve.load_server(folder, slots=2, max_len=16, kv_blocks=None, block_size=4, dtype="float32")
    assert isinstance(server.engine, SequenceWiseEngine) and server.model_name == "llama"
    request = Request(prompt=(5, 6, 7), max_new_tokens=6)
    (completion,) = server.engine.run([request]).completions
    with torch.no_grad():
        out = llama.generate(torch.tensor([request.prompt]), max_new_tokens=6, do_sample=False,
                             eos_token_id=0, pad_token_id=0)
    assert completion.tokens == out[0, 3:].tolist()


def test_mor_serve_refuses_a_folder_without_a_model(tmp_path, capsys):
    assert serve.main([str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
