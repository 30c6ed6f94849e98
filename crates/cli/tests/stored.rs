//! Stored chat completions on a live `ferrolm serve`: `store: true` + metadata, the OpenAI
//! routes that read them back (list with filters and paging, retrieve, messages, update,
//! delete), per-key isolation, metadata limits, streamed requests, `--store-all`, retention,
//! an upstream teacher, and the export to fine-tuning JSONL (CLI and API).
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use serde_json::{json, Value};

/// A request with an optional key; (status, JSON body).
fn call(
    s: &Server,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut r = ureq::request(method, &s.url(path));
    if let Some(k) = key {
        r = r.set("Authorization", &format!("Bearer {k}"));
    }
    let res = match body {
        Some(b) => r
            .set("Content-Type", "application/json")
            .send_string(&b.to_string()),
        None => r.call(),
    };
    let (status, text) = match res {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
    (status, v)
}

fn chat(s: &Server, key: Option<&str>, extra: Value) -> Value {
    let mut body = json!({
        "messages": [
            {"role": "system", "content": "You are brief."},
            {"role": "user", "content": "Name a colour."}
        ],
        "max_tokens": 6,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v) = call(s, "POST", "/v1/chat/completions", key, Some(&body));
    assert_eq!(status, 200, "{v}");
    v
}

/// A streamed chat request: the content it streamed, and the answer id.
fn chat_streamed(s: &Server, key: Option<&str>, extra: Value) -> (String, String) {
    let mut body = json!({
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": true,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let mut r = ureq::post(&s.url("/v1/chat/completions")).set("Content-Type", "application/json");
    if let Some(k) = key {
        r = r.set("Authorization", &format!("Bearer {k}"));
    }
    let text = r
        .send_string(&body.to_string())
        .unwrap()
        .into_string()
        .unwrap();
    let (mut content, mut id) = (String::new(), String::new());
    for line in text.lines() {
        let Some(d) = line.strip_prefix("data: ") else {
            continue;
        };
        if d == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(d).unwrap();
        id = v["id"].as_str().unwrap().to_owned();
        if let Some(c) = v
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            content.push_str(c);
        }
    }
    assert!(text.contains("data: [DONE]"), "{text}");
    (content, id)
}

fn ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn stored_completions_list_filter_page_retrieve_update_delete_and_stay_with_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = create_key(dir.path(), "team-a", &[]);
    let b = create_key(dir.path(), "team-b", &[]);
    let s = Server::start_in(dir.path(), &["--train-threads", "1"]);
    let ka = Some(a.as_str());
    let kb = Some(b.as_str());

    let c1 = chat(
        &s,
        ka,
        json!({"store": true, "metadata": {"task": "colours", "run": "1"}}),
    );
    let c2 = chat(
        &s,
        ka,
        json!({"store": true, "metadata": {"task": "other"}}),
    );
    let c3 = chat(
        &s,
        ka,
        json!({"store": true, "metadata": {"task": "colours"}, "logprobs": true, "top_logprobs": 2}),
    );
    let not_kept = chat(&s, ka, json!({"metadata": {"task": "colours"}}));
    let (streamed, c4) = chat_streamed(
        &s,
        ka,
        json!({"store": true, "metadata": {"task": "colours"}}),
    );
    let theirs = chat(
        &s,
        kb,
        json!({"store": true, "metadata": {"task": "colours"}}),
    );
    let id = |v: &Value| v["id"].as_str().unwrap().to_owned();
    let (id1, id2, id3, idb) = (id(&c1), id(&c2), id(&c3), id(&theirs));

    // List: oldest first by default, the caller's only; the one without `store` is not there.
    let (status, l) = call(&s, "GET", "/v1/chat/completions", ka, None);
    assert_eq!(status, 200, "{l}");
    assert_eq!(l["object"], "list");
    assert_eq!(ids(&l), [id1.clone(), id2.clone(), id3.clone(), c4.clone()]);
    assert_eq!(
        (l["first_id"].as_str(), l["last_id"].as_str()),
        (Some(id1.as_str()), Some(c4.as_str()))
    );
    assert_eq!(l["has_more"], false);
    assert!(!ids(&l).contains(&id(&not_kept)));
    assert_eq!(
        ids(&call(&s, "GET", "/v1/chat/completions", kb, None).1),
        vec![idb.clone()]
    );

    // Paging: order, limit, after.
    let (_, p1) = call(
        &s,
        "GET",
        "/v1/chat/completions?order=desc&limit=3",
        ka,
        None,
    );
    assert_eq!(ids(&p1), [c4.clone(), id3.clone(), id2.clone()]);
    assert_eq!(p1["has_more"], true);
    let (_, p2) = call(
        &s,
        "GET",
        &format!("/v1/chat/completions?order=desc&limit=3&after={id2}"),
        ka,
        None,
    );
    assert_eq!(
        (ids(&p2), p2["has_more"].clone()),
        (vec![id1.clone()], json!(false))
    );
    let (status, e) = call(
        &s,
        "GET",
        &format!("/v1/chat/completions?after={idb}"),
        ka,
        None,
    );
    assert_eq!(
        status, 400,
        "another key's id is no place in this list: {e}"
    );
    for bad in ["limit=0", "limit=101", "order=sideways"] {
        let (status, e) = call(&s, "GET", &format!("/v1/chat/completions?{bad}"), ka, None);
        assert_eq!(status, 400, "{bad}: {e}");
    }

    // Filters: metadata (plain and percent-encoded brackets) and model.
    let (_, f) = call(
        &s,
        "GET",
        "/v1/chat/completions?metadata[task]=colours",
        ka,
        None,
    );
    assert_eq!(ids(&f), [id1.clone(), id3.clone(), c4.clone()]);
    let (_, f) = call(
        &s,
        "GET",
        "/v1/chat/completions?metadata%5Btask%5D=colours&metadata%5Brun%5D=1",
        ka,
        None,
    );
    assert_eq!(ids(&f), vec![id1.clone()]);
    let model = c1["model"].as_str().unwrap();
    assert_eq!(
        ids(&call(
            &s,
            "GET",
            &format!("/v1/chat/completions?model={model}"),
            ka,
            None
        )
        .1)
        .len(),
        4
    );
    assert!(ids(&call(&s, "GET", "/v1/chat/completions?model=nope", ka, None).1).is_empty());

    // Retrieve: the answer as the client got it, with its metadata.
    let (status, r) = call(&s, "GET", &format!("/v1/chat/completions/{id1}"), ka, None);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"], c1["choices"]);
    assert_eq!(r["usage"], c1["usage"]);
    assert_eq!(
        (r["model"].clone(), r["created"].clone()),
        (c1["model"].clone(), c1["created"].clone())
    );
    assert_eq!(r["metadata"], json!({"task": "colours", "run": "1"}));
    // Top log-probs are kept when asked for: one entry per reply token, two alternatives each.
    let (_, r3) = call(&s, "GET", &format!("/v1/chat/completions/{id3}"), ka, None);
    let lp = r3["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        lp.len() as u64,
        c3["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert!(
        lp.iter()
            .all(|t| t["top_logprobs"].as_array().unwrap().len() == 2),
        "{lp:?}"
    );
    assert_eq!(r3["choices"], c3["choices"]);
    // The streamed request is kept, assembled.
    let (status, r4) = call(&s, "GET", &format!("/v1/chat/completions/{c4}"), ka, None);
    assert_eq!(status, 200, "{r4}");
    assert_eq!(r4["choices"][0]["message"]["content"], streamed.as_str());
    assert!(!streamed.is_empty());
    assert_eq!(r4["choices"][0]["message"]["role"], "assistant");
    assert!(r4["choices"][0]["finish_reason"].is_string(), "{r4}");
    assert!(
        r4["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{r4}"
    );

    // Messages: the request's, with ids, paged.
    let (status, m) = call(
        &s,
        "GET",
        &format!("/v1/chat/completions/{id1}/messages"),
        ka,
        None,
    );
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], format!("{id1}-0"));
    assert_eq!(
        (
            m["data"][0]["role"].as_str(),
            m["data"][1]["content"].as_str()
        ),
        (Some("system"), Some("Name a colour."))
    );
    let (_, m1) = call(
        &s,
        "GET",
        &format!("/v1/chat/completions/{id1}/messages?limit=1"),
        ka,
        None,
    );
    assert_eq!(
        (ids(&m1), m1["has_more"].clone()),
        (vec![format!("{id1}-0")], json!(true))
    );
    let (_, m2) = call(
        &s,
        "GET",
        &format!("/v1/chat/completions/{id1}/messages?limit=1&after={id1}-0"),
        ka,
        None,
    );
    assert_eq!(
        (ids(&m2), m2["has_more"].clone()),
        (vec![format!("{id1}-1")], json!(false))
    );
    let (_, md) = call(
        &s,
        "GET",
        &format!("/v1/chat/completions/{id1}/messages?order=desc"),
        ka,
        None,
    );
    assert_eq!(ids(&md), [format!("{id1}-1"), format!("{id1}-0")]);

    // Update: the metadata is replaced.
    let (status, u) = call(
        &s,
        "POST",
        &format!("/v1/chat/completions/{id2}"),
        ka,
        Some(&json!({"metadata": {"task": "colours", "fixed": "yes"}})),
    );
    assert_eq!(status, 200, "{u}");
    assert_eq!(u["metadata"], json!({"task": "colours", "fixed": "yes"}));
    assert_eq!(
        ids(&call(
            &s,
            "GET",
            "/v1/chat/completions?metadata[fixed]=yes",
            ka,
            None
        )
        .1),
        vec![id2.clone()]
    );

    // Another key's completion is a 404 on every route, and is left alone.
    for (method, path, body) in [
        ("GET", format!("/v1/chat/completions/{id1}"), None),
        ("GET", format!("/v1/chat/completions/{id1}/messages"), None),
        (
            "POST",
            format!("/v1/chat/completions/{id1}"),
            Some(json!({"metadata": {"x": "y"}})),
        ),
        ("DELETE", format!("/v1/chat/completions/{id1}"), None),
    ] {
        let (status, e) = call(&s, method, &path, kb, body.as_ref());
        assert_eq!(status, 404, "{method} {path}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(&id1),
            "{e}"
        );
    }
    assert_eq!(
        call(&s, "GET", &format!("/v1/chat/completions/{id1}"), ka, None).1["metadata"]["run"],
        "1"
    );

    // Metadata over OpenAI's limits is a 400 naming the limit, on create and on update.
    let many: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    for (bad, needle) in [
        (Value::Object(many), "16"),
        (json!({"k".repeat(65): "v"}), "64"),
        (json!({"k": "v".repeat(513)}), "512"),
        (json!({"k": 1}), "strings"),
    ] {
        let body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "store": true, "metadata": bad});
        let (status, e) = call(&s, "POST", "/v1/chat/completions", ka, Some(&body));
        assert_eq!(status, 400, "{e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle) && e["error"]["param"] == "metadata",
            "{e}"
        );
        let (status, e) = call(
            &s,
            "POST",
            &format!("/v1/chat/completions/{id2}"),
            ka,
            Some(&json!({"metadata": bad})),
        );
        assert_eq!(status, 400, "{e}");
    }
    assert_eq!(
        ids(&call(&s, "GET", "/v1/chat/completions", ka, None).1).len(),
        4,
        "refused requests are not kept"
    );

    // Export through the API: key A's `colours` completions as a fine-tune file.
    let (status, file) = call(
        &s,
        "POST",
        "/v1/chat/completions/export",
        ka,
        Some(&json!({"metadata": {"task": "colours"}})),
    );
    assert_eq!(status, 200, "{file}");
    assert_eq!(
        (file["object"].as_str(), file["purpose"].as_str()),
        (Some("file"), Some("fine-tune"))
    );
    let content = ureq::get(&s.url(&format!(
        "/v1/files/{}/content",
        file["id"].as_str().unwrap()
    )))
    .set("Authorization", &format!("Bearer {a}"))
    .call()
    .unwrap()
    .into_string()
    .unwrap();
    let lines: Vec<Value> = content
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{content}");
    assert_eq!(
        lines[0]["messages"],
        json!([
            {"role": "system", "content": "You are brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": c1["choices"][0]["message"]["content"]},
        ])
    );
    assert!(lines.iter().all(|l| l.get("logprobs").is_none()));
    let (status, e) = call(
        &s,
        "POST",
        "/v1/chat/completions/export",
        ka,
        Some(&json!({"metadata": {"task": "none-such"}})),
    );
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing to export"),
        "{e}"
    );
    // Another key's files do not see it.
    assert_eq!(
        call(
            &s,
            "GET",
            &format!("/v1/files/{}", file["id"].as_str().unwrap()),
            kb,
            None
        )
        .0,
        404
    );
    // ... and the file trains: stored traffic → file → fine-tuning job → a model that answers.
    let (status, job) = call(
        &s,
        "POST",
        "/v1/fine_tuning/jobs",
        ka,
        Some(&json!({
            "model": "smollm2-135m-instruct",
            "training_file": file["id"],
            "hyperparameters": {"n_epochs": 1, "batch_size": 4},
        })),
    );
    assert_eq!(status, 200, "{job}");
    let job_path = format!("/v1/fine_tuning/jobs/{}", job["id"].as_str().unwrap());
    let t0 = std::time::Instant::now();
    let done = loop {
        let (_, j) = call(&s, "GET", &job_path, ka, None);
        match j["status"].as_str().unwrap() {
            "succeeded" => break j,
            "failed" | "cancelled" => panic!("the job on the exported file ended: {j}"),
            _ => {}
        }
        assert!(t0.elapsed().as_secs() < 300, "the job did not finish: {j}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert_eq!(
        done["trained_tokens"].as_u64().map(|t| t > 0),
        Some(true),
        "{done}"
    );
    let tuned = done["fine_tuned_model"].as_str().unwrap();
    chat(&s, ka, json!({"model": tuned}));

    // Delete.
    let (status, d) = call(
        &s,
        "DELETE",
        &format!("/v1/chat/completions/{id3}"),
        ka,
        None,
    );
    assert_eq!(status, 200, "{d}");
    assert_eq!(
        d,
        json!({"id": id3, "object": "chat.completion.deleted", "deleted": true})
    );
    assert_eq!(
        call(&s, "GET", &format!("/v1/chat/completions/{id3}"), ka, None).0,
        404
    );
    assert_eq!(
        call(
            &s,
            "DELETE",
            &format!("/v1/chat/completions/{id3}"),
            ka,
            None
        )
        .0,
        404
    );

    // Export through the CLI, while the server runs (the store is shared).
    let out_file = dir.path().join("sft.jsonl");
    let out = ferrolm()
        .args([
            "data",
            "export",
            "--stored",
            "--format",
            "sft",
            "--metadata",
            "task=colours",
            "--data-dir",
        ])
        .arg(dir.path())
        .arg("--out")
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("4 examples from 4 stored completions"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&out_file).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Key A's c1, c2 (relabelled `colours`), c4, and key B's: every key's without --key.
    let replies: Vec<&Value> = lines
        .iter()
        .map(|l| l["messages"].as_array().unwrap().last().unwrap())
        .collect();
    assert_eq!(
        replies[0]["content"],
        c1["choices"][0]["message"]["content"]
    );
    assert_eq!(
        replies[1]["content"],
        c2["choices"][0]["message"]["content"]
    );
    assert_eq!(replies[2]["content"], streamed.as_str());
    assert_eq!(
        replies[3]["content"],
        theirs["choices"][0]["message"]["content"]
    );
    assert!(replies.iter().all(|r| r["role"] == "assistant"));
    let out = ferrolm()
        .args([
            "data",
            "export",
            "--stored",
            "--key",
            "team-b",
            "--data-dir",
        ])
        .arg(dir.path())
        .arg("--out")
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&out_file).unwrap().lines().count(),
        1
    );
    // --with-logprobs: only the replies stored with log-probs, with them.
    let c5 = chat(
        &s,
        ka,
        json!({"store": true, "metadata": {"task": "lp"}, "logprobs": true, "top_logprobs": 3}),
    );
    let out = ferrolm()
        .args([
            "data",
            "export",
            "--stored",
            "--with-logprobs",
            "--data-dir",
        ])
        .arg(dir.path())
        .arg("--out")
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("1 examples from 5 stored completions (4 replies left out"),
        "{stdout}"
    );
    let line: Value =
        serde_json::from_str(std::fs::read_to_string(&out_file).unwrap().trim()).unwrap();
    assert_eq!(line["logprobs"], c5["choices"][0]["logprobs"]["content"]);
    assert_eq!(
        line["logprobs"][0]["top_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    // Nothing that matches is an error that says why.
    let out = ferrolm()
        .args([
            "data",
            "export",
            "--stored",
            "--model",
            "nope",
            "--data-dir",
        ])
        .arg(dir.path())
        .arg("--out")
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to export"));
}

#[test]
fn store_all_keeps_every_request_unless_it_says_no_and_retention_forgets_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path(), &["--store-all", "--store-retention-days", "1"]);
    let kept = chat(&s, None, json!({}));
    let (_, streamed) = chat_streamed(&s, None, json!({}));
    chat(&s, None, json!({"store": false}));
    let (_, l) = call(&s, "GET", "/v1/chat/completions", None, None);
    assert_eq!(
        ids(&l),
        [kept["id"].as_str().unwrap().to_owned(), streamed.clone()]
    );
    // Make the first one two days old: the retention limit forgets it.
    let db = rusqlite::Connection::open(dir.path().join("ferrolm.db")).unwrap();
    db.execute(
        "UPDATE chat_completions SET created = created - 2 * 86400 WHERE id = ?1",
        [kept["id"].as_str().unwrap()],
    )
    .unwrap();
    let (_, l) = call(&s, "GET", "/v1/chat/completions", None, None);
    assert_eq!(ids(&l), [streamed]);
    let (status, _) = call(
        &s,
        "GET",
        &format!("/v1/chat/completions/{}", kept["id"].as_str().unwrap()),
        None,
        None,
    );
    assert_eq!(status, 404);
}

#[test]
fn a_proxied_upstream_teachers_answers_are_stored_streamed_or_not() {
    let teacher = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!("[[model]]\nid = \"teacher\"\nupstream = \"{}/v1\"\nupstream_model = \"smollm2-135m-instruct\"\n", teacher.base),
    )
    .unwrap();
    let proxy = Server::start(&["--config", cfg.to_str().unwrap(), "--store-all"]);
    let whole = chat(
        &proxy,
        None,
        json!({"model": "teacher", "metadata": {"src": "upstream"}}),
    );
    let (streamed, sid) = chat_streamed(&proxy, None, json!({"model": "teacher"}));
    let (_, l) = call(
        &proxy,
        "GET",
        "/v1/chat/completions?metadata[src]=upstream",
        None,
        None,
    );
    assert_eq!(ids(&l), [whole["id"].as_str().unwrap().to_owned()]);
    assert_eq!(l["data"][0]["choices"], whole["choices"]);
    let (status, r) = call(
        &proxy,
        "GET",
        &format!("/v1/chat/completions/{sid}"),
        None,
        None,
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["message"]["content"], streamed.as_str());
    assert!(r["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{r}");
    // The teacher itself kept nothing: the proxy stores, the client did not ask upstream to.
    assert!(ids(&call(&teacher, "GET", "/v1/chat/completions", None, None).1).is_empty());
}
