"""The official `openai` client's files and fine-tuning calls against a live `ferrolm serve`
(started by crates/cli/tests/finetune_api.rs, with keys).

Environment:
  FERROLM_KEYED     http://127.0.0.1:PORT of a server whose data dir has keys
  FERROLM_KEY_A     a key that uploads, fine-tunes, chats with its model
  FERROLM_KEY_B     another key, which must see none of A's files, jobs or models

The checks run in order (later ones use what earlier ones made); each prints ok/FAIL and the
script exits non-zero if any failed.
"""

import io
import json
import os
import sys
import time
import traceback

import openai

BASE = os.environ["FERROLM_KEYED"] + "/v1"
MODEL = "smollm2-135m-instruct"
a = openai.OpenAI(base_url=BASE, api_key=os.environ["FERROLM_KEY_A"], max_retries=0, timeout=300)
b = openai.OpenAI(base_url=BASE, api_key=os.environ["FERROLM_KEY_B"], max_retries=0, timeout=300)

PAIRS = [
    ("What is 2+2?", "4."), ("Capital of France?", "Paris."), ("Color of the sky?", "Blue."),
    ("What is 3+3?", "6."), ("Capital of Italy?", "Rome."), ("Color of grass?", "Green."),
    ("What is 5+5?", "10."), ("Capital of Spain?", "Madrid."), ("Color of snow?", "White."),
    ("What is 1+1?", "2."), ("Capital of Japan?", "Tokyo."), ("Color of coal?", "Black."),
]
TRAIN = "".join(
    json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Bolt says: " + r}]}) + "\n"
    for q, r in PAIRS
).encode()
state = {}


def wait_for(job_id, statuses, client=a, limit=240):
    t0 = time.time()
    while time.time() - t0 < limit:
        j = client.fine_tuning.jobs.retrieve(job_id)
        if j.status in statuses:
            return j
        time.sleep(0.5)
    raise AssertionError(f"{job_id} is still {j.status} after {limit} s")


def check_a_bad_file_is_refused_with_its_line_numbers():
    bad = TRAIN.splitlines(keepends=True)[:2] + [b"{not json\n", b'{"messages": []}\n']
    try:
        a.files.create(file=("bad.jsonl", io.BytesIO(b"".join(bad))), purpose="fine-tune")
    except openai.BadRequestError as e:
        msg = e.body["message"]
        assert "line 3:" in msg and "line 4:" in msg and "line 1:" not in msg, msg
    else:
        raise AssertionError("a bad file was accepted")
    try:
        a.files.create(file=("x.jsonl", io.BytesIO(TRAIN)), purpose="assistants")
    except openai.BadRequestError as e:
        assert e.body["param"] == "purpose", e.body
    else:
        raise AssertionError("purpose=assistants was accepted")


def check_a_too_large_file_is_413():
    try:
        a.files.create(file=("big.jsonl", io.BytesIO(b" " * (65 << 20))), purpose="fine-tune")
    except openai.APIStatusError as e:
        assert e.status_code == 413, e
    else:
        raise AssertionError("a 65 MiB file was accepted")


def check_upload_list_get_content():
    f = a.files.create(file=("train.jsonl", io.BytesIO(TRAIN)), purpose="fine-tune")
    assert f.id.startswith("file-") and f.object == "file" and f.bytes == len(TRAIN), f
    assert f.filename == "train.jsonl" and f.purpose == "fine-tune" and f.status == "processed", f
    assert f.id in [x.id for x in a.files.list().data]
    assert a.files.retrieve(f.id).bytes == len(TRAIN)
    assert a.files.content(f.id).read() == TRAIN
    state["file"] = f.id
    # Deleting works (on a second copy).
    g = a.files.create(file=("copy.jsonl", io.BytesIO(TRAIN)), purpose="fine-tune")
    assert a.files.delete(g.id).deleted
    try:
        a.files.retrieve(g.id)
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("a deleted file is still there")


def check_another_key_sees_nothing_and_cannot_use_the_file():
    fid = state["file"]
    assert fid not in [x.id for x in b.files.list().data]
    for call in (lambda: b.files.retrieve(fid), lambda: b.files.content(fid), lambda: b.files.delete(fid)):
        try:
            call()
        except openai.NotFoundError:
            pass
        else:
            raise AssertionError("key B reached key A's file")
    try:
        b.fine_tuning.jobs.create(model=MODEL, training_file=fid)
    except openai.NotFoundError as e:
        assert e.body["param"] == "training_file", e.body
        assert "train.jsonl" not in e.body["message"], e.body  # reveals nothing about it
    else:
        raise AssertionError("key B fine-tuned on key A's file")


def check_bad_job_requests():
    fid = state["file"]
    for kwargs, param in [
        ({"model": "no-such-model", "training_file": fid}, "model"),
        ({"model": MODEL, "training_file": "file-nope"}, "training_file"),
        ({"model": MODEL, "training_file": fid, "hyperparameters": {"n_epochs": 0}}, "hyperparameters"),
        # a reinforcement job needs its grader
        ({"model": MODEL, "training_file": fid, "method": {"type": "reinforcement"}}, "method"),
        # a chat file is not a preference file
        ({"model": MODEL, "training_file": fid, "method": {"type": "dpo"}}, "training_file"),
        ({"model": MODEL, "training_file": fid,
          "method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}}, "hyperparameters"),
    ]:
        try:
            a.fine_tuning.jobs.create(**kwargs)
        except (openai.BadRequestError, openai.NotFoundError) as e:
            assert e.body["param"] == param, (kwargs, e.body)
        else:
            raise AssertionError(f"accepted {kwargs}")


def check_a_job_runs_to_success_and_its_model_answers():
    job = a.fine_tuning.jobs.create(
        model=MODEL,
        training_file=state["file"],
        suffix="bolt",
        seed=7,
        metadata={"test": "sdk"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
    )
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job", job
    assert job.status in ("validating_files", "queued", "running"), job.status
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 4, job.hyperparameters
    assert job.hyperparameters.learning_rate_multiplier == 1, job.hyperparameters  # "auto"
    assert job.seed == 7 and job.metadata == {"test": "sdk"} and job.organization_id == "org-ferrolm"
    done = wait_for(job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done
    assert done.fine_tuned_model == f"ft:{MODEL}:bolt:{job.id}", done.fine_tuned_model
    assert done.finished_at and done.trained_tokens and done.trained_tokens > 0, done
    events = a.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].created_at >= events[-1].created_at  # newest first
    messages = [e.message for e in events]
    assert any("successfully completed" in m for m in messages), messages
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and metrics[0].data["step"] == 3 and metrics[0].data["train_loss"] > 0, metrics
    page = a.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(page.data) == 2 and page.has_more
    rest = a.fine_tuning.jobs.list_events(job.id, after=page.data[-1].id, limit=100).data
    assert [e.id for e in page.data + rest] == [e.id for e in events]
    cps = a.fine_tuning.jobs.checkpoints.list(job.id).data
    assert cps and cps[0].step_number == 3 and cps[0].fine_tuning_job_id == job.id, cps
    assert cps[0].fine_tuned_model_checkpoint.startswith(done.fine_tuned_model), cps[0]
    # Served at once, to its key only.
    ft = done.fine_tuned_model
    assert ft in [m.id for m in a.models.list().data]
    assert ft not in [m.id for m in b.models.list().data]
    # A LoRA adapter on the served base (no second copy of its weights).
    assert getattr(a.models.retrieve(ft), "parent", None) == MODEL, a.models.retrieve(ft)
    r = a.chat.completions.create(
        model=ft, messages=[{"role": "user", "content": "Capital of France?"}], temperature=0, max_tokens=8
    )
    assert r.model == ft and r.choices[0].message.content, r
    try:
        b.chat.completions.create(model=ft, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("key B chatted with key A's fine-tuned model")
    try:
        b.fine_tuning.jobs.retrieve(job.id)
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("key B read key A's job")
    assert job.id in [j.id for j in a.fine_tuning.jobs.list().data]
    assert b.fine_tuning.jobs.list().data == []
    state["done"] = job.id


def check_a_running_job_can_be_cancelled():
    job = a.fine_tuning.jobs.create(
        model=MODEL, training_file=state["file"], hyperparameters={"n_epochs": 5, "batch_size": 4}
    )
    wait_for(job.id, ("running",))
    time.sleep(2)
    c = a.fine_tuning.jobs.cancel(job.id)
    assert c.status == "cancelled", c.status
    try:
        a.fine_tuning.jobs.cancel(job.id)
    except openai.BadRequestError:
        pass
    else:
        raise AssertionError("a cancelled job was cancelled again")
    # The worker lets go of it: a later job runs (and the cancelled one stays cancelled).
    nxt = a.fine_tuning.jobs.create(
        model=MODEL, training_file=state["file"], hyperparameters={"n_epochs": 1, "batch_size": 4}
    )
    wait_for(nxt.id, ("running", "succeeded"))
    a.fine_tuning.jobs.cancel(nxt.id)
    j = a.fine_tuning.jobs.retrieve(job.id)
    assert j.status == "cancelled" and j.fine_tuned_model is None, j
    listed = a.fine_tuning.jobs.list(limit=2)
    assert [x.id for x in listed.data] == [nxt.id, job.id] and listed.has_more, listed
    older = a.fine_tuning.jobs.list(after=job.id).data
    assert [x.id for x in older] == [state["done"]], older


def check_a_paused_job_resumes_from_its_checkpoint_to_success():
    job = a.fine_tuning.jobs.create(
        model=MODEL, training_file=state["file"], hyperparameters={"n_epochs": 5, "batch_size": 4}
    )
    wait_for(job.id, ("running",))
    time.sleep(3)
    p = a.fine_tuning.jobs.pause(job.id)
    assert p.status == "paused", p.status
    time.sleep(2)
    assert a.fine_tuning.jobs.retrieve(job.id).status == "paused"
    r = a.fine_tuning.jobs.resume(job.id)
    assert r.status in ("queued", "running"), r.status
    done = wait_for(job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done
    assert done.fine_tuned_model, done
    msgs = [e.message for e in a.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any("resumed from the checkpoint" in m for m in msgs), msgs


PREFS = "".join(
    json.dumps({
        "input": {"messages": [{"role": "user", "content": q}]},
        "preferred_output": [{"role": "assistant", "content": "Bolt says: " + r}],
        "non_preferred_output": [{"role": "assistant", "content": "I don't know."}],
    }) + "\n"
    for q, r in PAIRS
).encode()


def check_a_dpo_job_runs_with_preference_metrics():
    bad = PREFS.splitlines(keepends=True)[:1] + [
        b'{"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "assistant", "content": "a"}]}\n'
    ]
    try:
        a.files.create(file=("bad-prefs.jsonl", io.BytesIO(b"".join(bad))), purpose="fine-tune")
    except openai.BadRequestError as e:
        msg = e.body["message"]
        assert "line 2:" in msg and "non_preferred_output" in msg and "line 1:" not in msg, msg
    else:
        raise AssertionError("a bad preference file was accepted")
    f = a.files.create(file=("prefs.jsonl", io.BytesIO(PREFS)), purpose="fine-tune")
    job = a.fine_tuning.jobs.create(
        model=MODEL,
        training_file=f.id,
        validation_file=f.id,
        suffix="pref",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 2}}},
    )
    assert job.method.type == "dpo", job.method
    assert job.method.dpo.hyperparameters.beta == 0.2, job.method
    assert job.hyperparameters.batch_size == 2 and job.hyperparameters.n_epochs == 1, job.hyperparameters
    done = wait_for(job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done
    events = a.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e.data for e in events if e.type == "metrics"]
    assert any("train_pair_accuracy" in m and "train_reward_margin" in m for m in metrics), metrics
    assert any("full_valid_pair_accuracy" in m for m in metrics), metrics
    r = a.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Capital of France?"}],
        temperature=0, max_tokens=8,
    )
    assert r.choices[0].message.content, r
    # a supervised job on a preference file names the problem
    try:
        a.fine_tuning.jobs.create(model=MODEL, training_file=f.id)
    except openai.BadRequestError as e:
        assert e.body["param"] == "training_file", e.body
    else:
        raise AssertionError("a supervised job took a preference file")


RL_PROMPTS = "".join(
    json.dumps({"messages": [{"role": "user", "content": q + " Answer in one word."}], "answer": r.rstrip(".")}) + "\n"
    for q, r in PAIRS[:4]
).encode()
GRADER = {"type": "string_check", "name": "has_answer", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "operation": "ilike"}


def check_a_reinforcement_job_runs_with_a_grader():
    f = a.files.create(file=("prompts.jsonl", io.BytesIO(RL_PROMPTS)), purpose="fine-tune")
    # a grader that does not parse, and a file without the field the grader reads
    for method, param, needle in [
        ({"type": "reinforcement", "reinforcement": {"grader": {"type": "python", "source": "x"}}},
         "method", "python"),
        ({"type": "reinforcement", "reinforcement": {"grader": dict(GRADER, reference="{{item.label}}")}},
         "training_file", "line 1"),
    ]:
        try:
            a.fine_tuning.jobs.create(model=MODEL, training_file=f.id, method=method)
        except openai.BadRequestError as e:
            assert e.body["param"] == param and needle in e.body["message"], e.body
        else:
            raise AssertionError(f"accepted {method}")
    job = a.fine_tuning.jobs.create(
        model=MODEL,
        training_file=f.id,
        suffix="rl",
        method={"type": "reinforcement", "reinforcement": {
            "grader": GRADER,
            "hyperparameters": {"n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.5}}},
    )
    assert job.method.type == "reinforcement", job.method
    assert job.method.reinforcement.grader.type == "string_check", job.method
    assert job.method.reinforcement.hyperparameters.compute_multiplier == 0.5, job.method
    done = wait_for(job.id, ("succeeded", "failed", "cancelled"), limit=400)
    assert done.status == "succeeded", done
    events = a.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e.data for e in events if e.type == "metrics"]
    steps = [m for m in metrics if "train_reward_mean" in m]
    assert steps and all(0.0 <= m["train_reward_mean"] <= 1.0 for m in steps), metrics
    assert any("mean reward=" in e.message for e in events), [e.message for e in events]
    r = a.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Capital of France?"}],
        temperature=0, max_tokens=8,
    )
    assert r.choices[0].message.content, r


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
