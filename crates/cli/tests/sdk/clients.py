"""The official clients against a live `ferrolm serve` (started by crates/cli/tests/sdk.rs).

Environment:
  FERROLM_BASE      http://127.0.0.1:PORT of a server with no keys (loopback: open access)
  FERROLM_KEYED     http://127.0.0.1:PORT of a second server whose data dir has keys
  FERROLM_KEY_A     a key of FERROLM_KEYED without limits
  FERROLM_KEY_B     a key of FERROLM_KEYED limited to 2 requests per minute

Also LangChain's ChatOpenAI (langchain-openai). Every check is a function named check_*; each runs even when an earlier one failed, and the
script exits non-zero if any failed. After each bad request the server must still answer.
"""

import http.client
import json
import os
import sys
import threading
import time
import traceback
import urllib.parse

import jsonschema
import ollama
import openai
from pydantic import BaseModel

BASE = os.environ["FERROLM_BASE"]
KEYED = os.environ["FERROLM_KEYED"]
KEY_A = os.environ["FERROLM_KEY_A"]
KEY_B = os.environ["FERROLM_KEY_B"]
MODEL = "smollm2-135m-instruct"
# With SmolLM2's default system prompt the first token of this answer is a near-tie (logprobs
# -1.99 / -2.02 for "L" / "The"), which numerically equivalent kernels may break either way;
# the golden tests' system prompt gives a clear "The capital of France is Paris."
SYSTEM = "You are a helpful assistant."
PARIS_Q = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}]

client = openai.OpenAI(base_url=BASE + "/v1", api_key="not-needed", max_retries=0, timeout=300)


def raw(method, path, body=None, headers=None, base=BASE):
    """(status, headers, body bytes) of one plain HTTP request."""
    u = urllib.parse.urlparse(base)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


def metrics():
    _, _, body = raw("GET", "/metrics")
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def still_up():
    status, _, body = raw("GET", "/health")
    assert status == 200, (status, body)
    r = client.chat.completions.create(model=MODEL, messages=PARIS_Q, temperature=0, max_tokens=4)
    assert r.choices[0].message.content


def greedy_paris(max_tokens=24):
    return client.chat.completions.create(
        model=MODEL, messages=PARIS_Q, temperature=0, max_tokens=max_tokens
    )


# --- OpenAI SDK -------------------------------------------------------------------------------


def check_models():
    ids = [m.id for m in client.models.list().data]
    assert MODEL in ids, ids
    assert client.models.retrieve(MODEL).id == MODEL


def check_chat_and_stream_agree():
    r = greedy_paris()
    text = r.choices[0].message.content
    assert "Paris" in text, text
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=PARIS_Q,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text, (streamed, text)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [r.choices[0].finish_reason], finishes
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def check_completions():
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip(), r
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8
    parts = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text


def check_n_choices():
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a word."}], n=3, temperature=1.0, seed=7, max_tokens=16
    )
    assert [c.index for c in r.choices] == [0, 1, 2], r.choices
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) >= 2, texts
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a word."}], n=3, temperature=1.0, seed=7, max_tokens=16
    )
    assert [c.message.content for c in again.choices] == texts
    seen = {}
    for c in client.chat.completions.create(
        model=MODEL, messages=PARIS_Q, n=2, temperature=0, max_tokens=12, stream=True
    ):
        for ch in c.choices:
            seen.setdefault(ch.index, []).append(ch.delta.content or "")
    assert sorted(seen) == [0, 1], seen
    assert "".join(seen[0]) == "".join(seen[1])  # greedy: both choices agree


def check_stop_strings():
    r = client.chat.completions.create(model=MODEL, messages=PARIS_Q, temperature=0, max_tokens=24, stop=["Paris"])
    text = r.choices[0].message.content
    assert "Paris" not in text, text
    assert r.choices[0].finish_reason == "stop"


def check_seed_reproducibility():
    def once(seed):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], temperature=1.0, seed=seed, max_tokens=24
        ).choices[0].message.content

    assert once(42) == once(42)


def check_logprobs():
    r = client.chat.completions.create(model=MODEL, messages=PARIS_Q, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.logprob - 1e-4  # greedy picks the top token


def check_json_schema_validates():
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "country": {"type": "string", "maxLength": 40},
            "population_millions": {"type": "number"},
            "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3},
        },
        "required": ["city", "country", "population_millions", "landmarks"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        temperature=0,
        max_tokens=300,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
    )
    assert r.choices[0].finish_reason == "stop", r
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)

    class City(BaseModel):
        name: str
        country: str

    parsed = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Which city is the capital of France?"}],
        temperature=0,
        max_tokens=200,
        response_format=City,
    )
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City), parsed

    # json_object: as OpenAI's docs require, the messages ask for JSON (without that instruction a
    # model may run on to max_tokens; a 135M one loops on a repeated key, greedy, on some builds).
    json_q = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the capital of France? Answer in JSON with the key capital."},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=json_q, temperature=0, max_tokens=200, response_format={"type": "json_object"}
    )
    assert r.choices[0].finish_reason == "stop", r
    assert isinstance(json.loads(r.choices[0].message.content), dict)


WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"type": "string", "enum": ["C", "F"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    }
]


def check_forced_tool_call():
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        temperature=0,
        max_tokens=100,
        tools=WEATHER,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER[0]["function"]["parameters"])
    # The conversation goes on with the tool's answer.
    msgs += [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=30, tools=WEATHER)
    assert r2.choices[0].message.content or r2.choices[0].message.tool_calls
    # required + streaming: the call arrives as tool_call deltas.
    calls = {}
    finish = None
    for c in client.chat.completions.create(
        model=MODEL, messages=msgs[:1], temperature=0, max_tokens=100, tools=WEATHER, tool_choice="required", stream=True
    ):
        for tc in c.choices[0].delta.tool_calls or []:
            calls.setdefault(tc.index, {"name": "", "arguments": ""})
            if tc.function.name:
                calls[tc.index]["name"] = tc.function.name
            calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather", calls
    json.loads(calls[0]["arguments"])


def check_tool_choice_required_does_not_lose_the_call():
    # Regression: with the default parallel_tool_calls SmolLM2 repeated the forced call until
    # max_tokens, and the reply came back as raw <tool_call> text with no tool_calls at all.
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, temperature=0, max_tokens=60, tools=WEATHER, tool_choice="required"
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert len(choice.message.tool_calls) == 1, choice.message
    assert "<tool_call>" not in (choice.message.content or ""), choice.message
    jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), WEATHER[0]["function"]["parameters"])
    # Parallel calls asked for: the model may go on until max_tokens, but every complete call
    # is kept, and finish_reason says whether the reply was cut.
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, temperature=0, max_tokens=60, tools=WEATHER, tool_choice="required",
        parallel_tool_calls=True,
    )
    choice = r.choices[0]
    assert choice.message.tool_calls, choice.message
    assert "<tool_call>" not in (choice.message.content or ""), choice.message
    assert choice.finish_reason in ("tool_calls", "length"), choice
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER[0]["function"]["parameters"])


def check_cached_tokens_on_a_repeated_prefix():
    system = "You are a careful assistant. " + " ".join(f"Rule {i}: answer plainly and briefly." for i in range(150))
    def ask(q):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": q}], temperature=0, max_tokens=4
        )
    first = ask("What is 2+2?")
    assert first.usage.prompt_tokens > 1000, first.usage
    second = ask("What is the capital of Italy?")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 1000, second.usage


def check_sixteen_concurrent_streams():
    want = greedy_paris().choices[0].message.content
    results = [None] * 16
    def run(i):
        try:
            s = client.chat.completions.create(model=MODEL, messages=PARIS_Q, temperature=0, max_tokens=24, stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == want for r in results), results


def wait_idle(timeout=20):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = metrics()
        running = m.get(f'ferrolm_requests_running{{model="{MODEL}"}}')
        used = m.get(f'ferrolm_kv_blocks_used{{model="{MODEL}"}}')
        if running == 0 and used == 0:
            return m
        time.sleep(0.2)
    raise AssertionError(f"engine still busy: {m}")


def check_disconnect_frees_kv_blocks():
    wait_idle()
    s = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 1000."}], temperature=0, max_tokens=2000, stream=True
    )
    got = 0
    for c in s:
        got += 1
        if got == 5:
            break
    assert f'ferrolm_kv_blocks_used{{model="{MODEL}"}}' in metrics()
    s.close()
    wait_idle()
    still_up()


def check_bad_input_is_refused_and_the_server_stays_up():
    def post(body, path="/v1/chat/completions"):
        status, _, data = raw("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode())
        return status, json.loads(data)

    cases = [
        (b'{"model": "x", "messages": [', 400, None),
        ({"model": MODEL, "messages": "hello"}, 400, None),
        ({"model": MODEL, "messages": PARIS_Q, "temperature": "hot"}, 400, None),
        ({"model": MODEL, "messages": []}, 400, "empty"),
        ({"model": MODEL, "messages": PARIS_Q, "n": 0}, 400, "n must"),
        ({"model": MODEL, "messages": PARIS_Q, "max_tokens": 100000}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hello " * 9000}]}, 400, "more than"),
        (b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
        ({"model": "gpt-17", "messages": PARIS_Q}, 404, "gpt-17"),
    ]
    for body, want, needle in cases:
        status, err = post(body)
        assert status == want, (body if isinstance(body, bytes) else str(body)[:80], status, err)
        assert err["error"]["message"] and err["error"]["type"], err
        if needle:
            assert needle in err["error"]["message"], err
        still_up()
    status, _, data = raw("POST", "/v1/chat/completions", b"x" * (10 * 1024 * 1024))
    assert status == 413, status
    assert "larger" in json.loads(data)["error"]["message"]
    try:
        client.chat.completions.create(model="gpt-17", messages=PARIS_Q)
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError:
        pass
    try:
        client.chat.completions.create(model=MODEL, messages=PARIS_Q, max_tokens=100000)
        raise AssertionError("max_tokens over the context accepted")
    except openai.BadRequestError:
        pass
    still_up()


# --- keys and limits ---------------------------------------------------------------------------


def keyed(key):
    return openai.OpenAI(base_url=KEYED + "/v1", api_key=key, max_retries=0, timeout=300)


def check_keys_and_rate_limits():
    for key in ["flm-not-a-key", ""]:
        try:
            keyed(key or "x").chat.completions.create(model=MODEL, messages=PARIS_Q, max_tokens=2)
            raise AssertionError("a bad key was accepted")
        except openai.AuthenticationError:
            pass
    status, _, _ = raw("GET", "/v1/models", base=KEYED)
    assert status == 401
    status, _, _ = raw("GET", "/health", base=KEYED)
    assert status == 200
    r = keyed(KEY_A).chat.completions.with_raw_response.create(model=MODEL, messages=PARIS_Q, temperature=0, max_tokens=4)
    assert r.http_response.status_code == 200
    assert float(r.headers["x-ferrolm-cost-usd"]) >= 0
    b = keyed(KEY_B)
    ok = b.chat.completions.with_raw_response.create(model=MODEL, messages=PARIS_Q, temperature=0, max_tokens=4)
    assert ok.headers["x-ratelimit-limit-requests"] == "2", dict(ok.headers)
    assert ok.headers["x-ratelimit-remaining-requests"] == "1", dict(ok.headers)
    b.chat.completions.create(model=MODEL, messages=PARIS_Q, temperature=0, max_tokens=4)
    try:
        b.chat.completions.create(model=MODEL, messages=PARIS_Q, temperature=0, max_tokens=4)
        raise AssertionError("the third request in a minute was accepted with rpm=2")
    except openai.RateLimitError as e:
        assert int(e.response.headers["retry-after"]) >= 1
        assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
    # Each key sees only its own usage.
    def usage(key):
        status, _, data = raw("GET", "/v1/usage?by=model", headers={"Authorization": f"Bearer {key}"}, base=KEYED)
        assert status == 200, data
        return json.loads(data)["data"]
    a, bb = usage(KEY_A), usage(KEY_B)
    assert sum(g["requests"] for g in a) == 1, a
    assert sum(g["requests"] for g in bb) >= 2, bb


# --- Responses API -----------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def check_responses_text_and_usage():
    r = client.responses.create(model=MODEL, instructions=SYSTEM, input="What is the capital of France?", temperature=0, max_output_tokens=24)
    assert r.id.startswith("resp_") and r.object == "response", r
    assert r.status in ("completed", "incomplete"), r.status
    assert "Paris" in r.output_text, r.output_text
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text", r.output
    # The same answer as chat's, token for token.
    assert r.output_text == greedy_paris(24).choices[0].message.content
    u = r.usage
    assert u.input_tokens > 0 and u.output_tokens > 0 and u.total_tokens == u.input_tokens + u.output_tokens, u
    # The repeated prompt is served from the prefix cache.
    again = client.responses.create(model=MODEL, instructions=SYSTEM, input="What is the capital of France?", temperature=0, max_output_tokens=24)
    assert again.usage.input_tokens_details.cached_tokens > 0, again.usage
    assert again.output_text == r.output_text


def check_responses_tool_call_and_its_output():
    r = client.responses.create(
        model=MODEL, input="What is the weather in Paris?", temperature=0, max_output_tokens=100,
        tools=[WEATHER_TOOL], tool_choice="required",
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather", r.output
    assert calls[0].call_id.startswith("call_"), calls[0]
    assert isinstance(json.loads(calls[0].arguments).get("city"), str), calls[0].arguments
    # The function's result goes back as a function_call_output item, and the model answers.
    r2 = client.responses.create(
        model=MODEL, temperature=0, max_output_tokens=40, tools=[WEATHER_TOOL],
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 24 C"},
        ],
    )
    assert r2.output_text, r2.output
    # The reply to a tool's result saw it: more input tokens than the question alone.
    assert r2.usage.input_tokens > r.usage.input_tokens, (r2.usage, r.usage)


def check_responses_json_schema():
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}}, "required": ["city", "population"], "additionalProperties": False}
    r = client.responses.create(
        model=MODEL, input="Name a large city and its population.", temperature=0, max_output_tokens=80,
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
    )
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema", r.text


def check_responses_previous_response_id_chain_retrieve_delete():
    first = client.responses.create(model=MODEL, instructions=SYSTEM, input="What is the capital of France?", temperature=0, max_output_tokens=16)
    second = client.responses.create(model=MODEL, previous_response_id=first.id, input="And of Italy?", temperature=0, max_output_tokens=16)
    assert second.previous_response_id == first.id
    # The chain carries the first turn and its answer: more input, and that prefix was cached.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 8, (first.usage, second.usage)
    items = client.responses.input_items.list(second.id, order="asc")
    texts = [c.text for i in items.data if i.type == "message" for c in i.content]
    assert texts[0] == "What is the capital of France?" and texts[-1] == "And of Italy?", texts
    assert first.output_text in texts, texts
    got = client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == second.output_text
    client.responses.delete(second.id)
    for call in (lambda: client.responses.retrieve(second.id), lambda: client.responses.delete(second.id)):
        try:
            call()
            raise AssertionError("a deleted response was still there")
        except openai.NotFoundError:
            pass
    try:
        client.responses.create(model=MODEL, previous_response_id=second.id, input="hi", max_output_tokens=4)
        raise AssertionError("a deleted previous_response_id was accepted")
    except openai.BadRequestError as e:
        assert "previous_response_id" in str(e), e
    # store: false keeps nothing.
    unstored = client.responses.create(model=MODEL, input="hi", store=False, max_output_tokens=4)
    try:
        client.responses.retrieve(unstored.id)
        raise AssertionError("a response with store: false was stored")
    except openai.NotFoundError:
        pass


def check_responses_stream():
    with client.responses.stream(model=MODEL, instructions=SYSTEM, input="What is the capital of France?", temperature=0, max_output_tokens=24) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    for t in ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
              "response.output_text.delta", "response.output_text.done", "response.content_part.done", "response.output_item.done"]:
        assert t in types, (t, types)
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete"), types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text
    # Streamed or not, the same greedy answer and usage; and the stream was stored too.
    whole = client.responses.create(model=MODEL, instructions=SYSTEM, input="What is the capital of France?", temperature=0, max_output_tokens=24)
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    assert client.responses.retrieve(final.id).output_text == final.output_text
    # A streamed tool call: the arguments' delta and done events.
    with client.responses.stream(model=MODEL, input="What is the weather in Paris?", temperature=0, max_output_tokens=100,
                                 tools=[WEATHER_TOOL], tool_choice="required") as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types, types
    call = [o for o in final.output if o.type == "function_call"][0]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"], call


def check_responses_are_per_key_and_bad_input_is_a_clear_4xx():
    a, b = keyed(KEY_A), keyed(KEY_B)
    mine = a.responses.create(model=MODEL, input="hi", temperature=0, max_output_tokens=4)
    assert a.responses.retrieve(mine.id).id == mine.id
    for call in (lambda: b.responses.retrieve(mine.id), lambda: b.responses.input_items.list(mine.id), lambda: b.responses.delete(mine.id)):
        try:
            call()
            raise AssertionError("another key's response was visible")
        except openai.NotFoundError:
            pass
    assert a.responses.retrieve(mine.id).id == mine.id
    bad = [
        ({"input": [{"type": "computer_call_output", "call_id": "x"}]}, "computer_call_output"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input_image"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "web_search"),
        ({"input": "hi", "tools": [{"type": "function", "parameters": {"type": "object"}}]}, "tools[0].name"),
        ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": 3}]}, "parameters"),
        ({"input": "hi", "previous_response_id": "resp_nope"}, "previous_response_id"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"input": [{"type": "item_reference", "id": "msg_nope"}]}, "msg_nope"),
        ({}, "input is missing"),
        ({"input": "hi", "background": True}, "background"),
    ]
    for body, said in bad:
        status, _, data = raw("POST", "/v1/responses", json.dumps({"model": MODEL, **body}))
        assert status == 400 and said in json.loads(data)["error"]["message"], (body, status, data)
    # Another key's response cannot be continued (checked before admission: B's rpm is spent).
    status, _, data = raw("POST", "/v1/responses", json.dumps({"model": MODEL, "input": "hi", "previous_response_id": mine.id}),
                          headers={"Authorization": f"Bearer {KEY_B}"}, base=KEYED)
    assert status == 400 and "previous_response_id" in json.loads(data)["error"]["message"], (status, data)
    still_up()


# --- Ollama client -----------------------------------------------------------------------------


def check_ollama_client():
    oc = ollama.Client(host=BASE)
    r = oc.chat(model=MODEL, messages=PARIS_Q, options={"temperature": 0, "num_predict": 24})
    assert "Paris" in r.message.content, r
    assert r.done and r.eval_count > 0 and r.prompt_eval_count > 0 and r.total_duration > 0
    streamed = "".join(p.message.content for p in oc.chat(model=MODEL, messages=PARIS_Q, options={"temperature": 0, "num_predict": 24}, stream=True))
    assert streamed == r.message.content, (streamed, r.message.content)
    g = oc.generate(model=MODEL, system=SYSTEM, prompt="What is the capital of France?", options={"temperature": 0, "num_predict": 24})
    assert "Paris" in g.response, g
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 30}}, "required": ["capital"]}
    f = oc.chat(model=MODEL, messages=PARIS_Q, format=schema, options={"temperature": 0, "num_predict": 100})
    jsonschema.validate(json.loads(f.message.content), schema)
    assert MODEL in [m.model for m in oc.list().models]
    show = oc.show(MODEL)
    assert show.details.family == "llama" and show.modelinfo["llama.context_length"] == 8192, show
    assert MODEL in [m.model for m in oc.ps().models]
    try:
        oc.chat(model="nope", messages=PARIS_Q)
        raise AssertionError("unknown model accepted")
    except ollama.ResponseError as e:
        assert e.status_code == 404


# --- LangChain ---------------------------------------------------------------------------------


def check_langchain_chat_openai():
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=BASE + "/v1", api_key="not-needed", model=MODEL, temperature=0, max_tokens=24, max_retries=0)
    q = [("system", SYSTEM), ("human", "What is the capital of France?")]
    r = llm.invoke(q)
    assert "Paris" in r.content, r
    assert "".join(c.content for c in llm.stream(q)) == r.content

    class City(BaseModel):
        name: str
        country: str

    roomy = ChatOpenAI(base_url=BASE + "/v1", api_key="not-needed", model=MODEL, temperature=0, max_tokens=200, max_retries=0)
    city = roomy.with_structured_output(City, method="json_schema").invoke("Which city is the capital of France?")
    assert isinstance(city, City), city

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    m = roomy.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    assert m.tool_calls and m.tool_calls[0]["name"] == "get_weather", m
    assert isinstance(m.tool_calls[0]["args"].get("city"), str), m.tool_calls


def main():
    only = sys.argv[1:]
    failed = []
    for name, fn in list(globals().items()):
        if not name.startswith("check_") or (only and name not in only):
            continue
        t0 = time.time()
        try:
            fn()
            print(f"ok    {name} ({time.time() - t0:.1f} s)", flush=True)
        except Exception:  # noqa: BLE001 - every failure is reported
            failed.append(name)
            print(f"FAIL  {name} ({time.time() - t0:.1f} s)\n{traceback.format_exc()}", flush=True)
    print(f"{len(failed)} failed: {failed}" if failed else "all checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
