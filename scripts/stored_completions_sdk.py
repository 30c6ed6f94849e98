"""The official `openai` Python SDK, unchanged, against stored chat completions on a live
`ferrolm serve`: create with store=True + metadata (plain and streamed), list with filters and
paging, retrieve, update, messages.list, delete, per-key isolation and metadata limits.

Run by crates/cli/tests/sdk.rs (which starts the server and makes the keys), or by hand:

  ferrolm keys create --name a --data-dir /tmp/d   # twice: a and b, note the secrets
  ferrolm serve --data-dir /tmp/d --port 8080 &
  FERROLM_BASE=http://127.0.0.1:8080 FERROLM_KEY_A=flm-... FERROLM_KEY_B=flm-... \
      python scripts/stored_completions_sdk.py

Environment:
  FERROLM_BASE    http://HOST:PORT of the server
  FERROLM_KEY_A   a key of it (omit for a server without keys)
  FERROLM_KEY_B   a second key, for the isolation check (omit to skip that one check)

Every check prints `ok NAME: what it saw` or `FAIL NAME: why`; the script exits non-zero if any
check failed.
"""

import os
import sys
import traceback
import uuid

import openai

BASE = os.environ["FERROLM_BASE"].rstrip("/")
KEY_A = os.environ.get("FERROLM_KEY_A") or "not-needed"
KEY_B = os.environ.get("FERROLM_KEY_B")
MODEL = os.environ.get("FERROLM_MODEL", "smollm2-135m-instruct")
RUN = uuid.uuid4().hex[:8]  # this run's metadata tag, so reruns on one server do not mix

a = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY_A, max_retries=0, timeout=300)
b = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY_B, max_retries=0, timeout=300) if KEY_B else None
MESSAGES = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Name a colour."},
]
failed = []
state = {}


def check(fn):
    try:
        print(f"ok {fn.__name__}: {fn()}")
    except Exception:  # noqa: BLE001 - every check reports, whatever it raised
        failed.append(fn.__name__)
        print(f"FAIL {fn.__name__}:\n{traceback.format_exc()}")
    return fn


@check
def create_with_store_and_metadata():
    ids = []
    for i in range(3):
        c = a.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
            store=True, metadata={"run": RUN, "i": str(i)},
        )
        assert c.object == "chat.completion", c
        ids.append(c.id)
    state["ids"] = ids
    state["first"] = c = a.chat.completions.retrieve(ids[0])
    return f"3 stored, first {ids[0]} says {c.choices[0].message.content!r}"


@check
def create_streamed_with_store():
    text, cid = "", None
    for chunk in a.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, stream=True,
        store=True, metadata={"run": RUN, "streamed": "yes"},
    ):
        cid = chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    got = a.chat.completions.retrieve(cid)
    assert got.choices[0].message.content == text, (got, text)
    state["streamed"] = cid
    return f"{cid} stored with the streamed text {text!r}"


@check
def list_filters_and_pages():
    page = a.chat.completions.list(metadata={"run": RUN}, limit=2)
    assert [c.id for c in page.data] == state["ids"][:2], page
    assert page.has_more, page
    every = [c.id for c in a.chat.completions.list(metadata={"run": RUN}, limit=1)]  # auto-paging
    assert every == state["ids"] + [state["streamed"]], every
    desc = [c.id for c in a.chat.completions.list(metadata={"run": RUN}, order="desc")]
    assert desc == list(reversed(every)), desc
    one = a.chat.completions.list(metadata={"run": RUN, "i": "1"})
    assert [c.id for c in one.data] == [state["ids"][1]], one
    by_model = a.chat.completions.list(model=MODEL, metadata={"run": RUN})
    assert len(by_model.data) == 4, by_model
    assert not a.chat.completions.list(model="no-such-model", metadata={"run": RUN}).data
    return f"limit=2 gave 2 + has_more; auto-paging limit=1 gave all {len(every)} in order; desc, metadata and model filters agree"


@check
def retrieve():
    c = a.chat.completions.retrieve(state["ids"][0])
    assert c.id == state["ids"][0] and c.model == MODEL, c
    assert c.metadata == {"run": RUN, "i": "0"}, c.metadata
    assert c.usage.completion_tokens > 0, c.usage
    return f"model {c.model}, metadata {c.metadata}, usage {c.usage.prompt_tokens}+{c.usage.completion_tokens}"


@check
def update_metadata():
    c = a.chat.completions.update(state["ids"][2], metadata={"run": RUN, "label": "good"})
    assert c.metadata == {"run": RUN, "label": "good"}, c.metadata
    found = a.chat.completions.list(metadata={"label": "good", "run": RUN})
    assert [x.id for x in found.data] == [state["ids"][2]], found
    return f"metadata now {c.metadata}, and the label filter finds it"


@check
def messages_list():
    msgs = a.chat.completions.messages.list(state["ids"][0])
    got = [(m.role, m.content) for m in msgs.data]
    assert got == [(m["role"], m["content"]) for m in MESSAGES], got
    assert msgs.data[0].id == state["ids"][0] + "-0", msgs.data[0]
    first = a.chat.completions.messages.list(state["ids"][0], limit=1)
    assert len(first.data) == 1 and first.has_more, first
    return f"{got}"


@check
def another_key_gets_404():
    if b is None:
        return "skipped: no FERROLM_KEY_B"
    for call in (
        lambda: b.chat.completions.retrieve(state["ids"][0]),
        lambda: b.chat.completions.update(state["ids"][0], metadata={"x": "y"}),
        lambda: b.chat.completions.messages.list(state["ids"][0]),
        lambda: b.chat.completions.delete(state["ids"][0]),
    ):
        try:
            call()
        except openai.NotFoundError:
            continue
        raise AssertionError("another key saw the completion")
    assert not b.chat.completions.list(metadata={"run": RUN}).data
    return "retrieve, update, messages.list, delete: NotFoundError; list: empty"


@check
def metadata_over_the_limits_is_a_400():
    seen = []
    for bad in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
        try:
            a.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, store=True, metadata=bad)
        except openai.BadRequestError as e:
            seen.append(e.body["message"] if isinstance(e.body, dict) else str(e))
            continue
        raise AssertionError(f"accepted {bad}")
    return "; ".join(seen)


@check
def delete():
    d = a.chat.completions.delete(state["ids"][1])
    assert d.deleted and d.id == state["ids"][1] and d.object == "chat.completion.deleted", d
    try:
        a.chat.completions.retrieve(state["ids"][1])
    except openai.NotFoundError:
        return f"{d.id} deleted; retrieve is then NotFoundError"
    raise AssertionError("still there after delete")


print(f"openai {openai.__version__} against {BASE}: {'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
sys.exit(1 if failed else 0)
