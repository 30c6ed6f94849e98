//! `ferrolm keys` and `ferrolm usage` as a user drives them: the real binary on a temp data dir.
//! No model needed.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::Path;
use std::process::Output;

use ferrolm_accounting::{Store, UsageRow};

fn run(dir: &Path, args: &[&str]) -> Output {
    let mut c = ferrolm();
    c.args(args).arg("--data-dir").arg(dir);
    c.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "ferrolm failed: {}\n{}",
        stderr(&o),
        stdout(&o)
    );
    o
}

/// Failed with a non-zero exit, no panic, and a message containing every needle.
fn fails(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure: {err}{}", stdout(o));
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains("error"), "{err}");
    for n in needles {
        assert!(err.contains(n), "error should mention `{n}`: {err}");
    }
}

#[test]
fn create_list_revoke_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("server");

    let o = ok(run(
        &dir,
        &["keys", "create", "--name", "ci", "--rpm", "60"],
    ));
    let secret = stdout(&o).trim().to_owned();
    assert_eq!(stdout(&o).lines().count(), 1, "only the secret on stdout");
    assert!(secret.starts_with("flm-") && secret.len() == 44, "{secret}");
    assert!(
        stderr(&o).contains("only time the secret is shown"),
        "{}",
        stderr(&o)
    );
    assert!(dir.join("ferrolm.db").exists());

    let o = ok(run(
        &dir,
        &[
            "keys",
            "create",
            "--name",
            "alice",
            "--tpm",
            "10000",
            "--budget-usd",
            "2.5",
            "--json",
        ],
    ));
    let created: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let secret2 = created["secret"].as_str().unwrap().to_owned();
    assert_eq!(created["name"], "alice");
    assert_eq!(created["tpm"], 10000);
    assert_eq!(created["budget_usd"], 2.5);
    assert!(created["rpm"].is_null());
    assert_eq!(created["prefix"].as_str().unwrap(), &secret2[..8]);
    assert_ne!(secret, secret2);

    // The server's view: the secrets verify.
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.verify(&secret).unwrap().unwrap().name, "ci");
    drop(store);

    let text = ok(run(&dir, &["keys", "list"]));
    let json = ok(run(&dir, &["keys", "list", "--json"]));
    for o in [&text, &json] {
        let all = format!("{}{}", stdout(o), stderr(o));
        assert!(all.contains("ci") && all.contains("alice"), "{all}");
        for s in [&secret, &secret2] {
            assert!(
                !all.contains(s.as_str()),
                "a secret leaked into list: {all}"
            );
            assert!(!all.contains(&s[..20]), "part of a secret leaked: {all}");
        }
    }
    assert!(
        stdout(&text).contains(&secret[..8]),
        "the display prefix is shown"
    );
    let listed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["name"], "ci");
    assert_eq!(listed[0]["rpm"], 60);
    assert_eq!(listed[0]["active"], true);
    assert_eq!(listed[0]["spent_usd"], 0.0);
    assert!(listed[0].get("secret").is_none());

    let o = ok(run(&dir, &["keys", "revoke", "ci"]));
    assert!(stdout(&o).contains("revoked key `ci`"), "{}", stdout(&o));
    let store = Store::open(&dir).unwrap();
    assert!(store.verify(&secret).unwrap().is_none(), "revoked");
    assert!(
        store.verify(&secret2).unwrap().is_some(),
        "the other key still works"
    );
    drop(store);
    let listed: serde_json::Value =
        serde_json::from_slice(&ok(run(&dir, &["keys", "list", "--json"])).stdout).unwrap();
    assert_eq!(listed[0]["active"], false);
    assert!(listed[0]["revoked"].is_i64());
    assert!(stdout(&ok(run(&dir, &["keys", "list"]))).contains("revoked"));

    fails(&run(&dir, &["keys", "revoke", "ci"]), &["already revoked"]);
    // By id, with JSON.
    let id = listed[1]["id"].as_i64().unwrap().to_string();
    let o = ok(run(&dir, &["keys", "revoke", &id, "--json"]));
    let k: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(k["name"], "alice");
    // A revoked name can be used again.
    ok(run(&dir, &["keys", "create", "--name", "ci"]));
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fails(
        &run(dir, &["keys", "create", "--name", "a", "--rpm", "0"]),
        &["rpm", "at least 1"],
    );
    fails(
        &run(dir, &["keys", "create", "--name", "a", "--rpm", "-5"]),
        &["--rpm", "not a limit"],
    );
    fails(
        &run(dir, &["keys", "create", "--name", "a", "--tpm", "0"]),
        &["tpm", "at least 1"],
    );
    fails(
        &run(
            dir,
            &["keys", "create", "--name", "a", "--budget-usd", "-1"],
        ),
        &["budget_usd", "> 0"],
    );
    fails(
        &run(dir, &["keys", "create", "--name", "has space"]),
        &["name", "letters, digits"],
    );
    fails(&run(dir, &["keys", "create", "--name", "42"]), &["key id"]);
    fails(&run(dir, &["keys", "create"]), &["--name"]);
    // Nothing was created by the failures.
    let listed: serde_json::Value =
        serde_json::from_slice(&ok(run(dir, &["keys", "list", "--json"])).stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 0);

    // Revoking with no store, then an unknown key in a real store.
    fails(
        &run(&dir.join("elsewhere"), &["keys", "revoke", "ghost"]),
        &["no key store"],
    );
    ok(run(dir, &["keys", "create", "--name", "a"]));
    fails(
        &run(dir, &["keys", "revoke", "ghost"]),
        &["`ghost`", "ferrolm keys list"],
    );
    fails(&run(dir, &["keys", "revoke", "999"]), &["`999`"]);
    fails(
        &run(dir, &["keys", "create", "--name", "a"]),
        &["already named `a`"],
    );

    fails(
        &run(dir, &["usage", "--since", "2025-13-01"]),
        &["2025-13-01", "YYYY-MM-DD"],
    );
    fails(
        &run(
            dir,
            &["usage", "--since", "2025-12-02", "--until", "2025-12-01"],
        ),
        &["--since", "empty"],
    );
    fails(
        &run(dir, &["usage", "--by", "week"]),
        &["week", "key, model or day"],
    );
    fails(&run(dir, &["usage", "--key", "ghost"]), &["`ghost`"]);
}

#[test]
fn usage_on_an_empty_store() {
    let tmp = tempfile::tempdir().unwrap();
    // No store at all: an empty report, and no store is created by reading.
    let none = tmp.path().join("nothing-here");
    let v = json_of(&run(&none, &["usage", "--json"]));
    assert_eq!(v["groups"].as_array().unwrap().len(), 0);
    assert_eq!(v["total"]["requests"], 0);
    assert!(!none.join("ferrolm.db").exists());
    let o = ok(run(&none, &["keys", "list"]));
    assert!(stderr(&o).contains("no keys"), "{}", stderr(&o));
    assert!(!none.exists());

    // A store with keys but no requests.
    let dir = tmp.path().join("server");
    ok(run(&dir, &["keys", "create", "--name", "a"]));
    let v = json_of(&run(&dir, &["usage", "--json", "--by", "key,model,day"]));
    assert_eq!(v["groups"].as_array().unwrap().len(), 0);
    assert_eq!(v["total"]["requests"], 0);
    assert_eq!(v["total"]["cost_usd"], 0.0);
    let o = ok(run(&dir, &["usage"]));
    let out = stdout(&o);
    assert!(out.starts_with("KEY") && out.contains("COST_USD"), "{out}");
    assert!(
        out.lines().last().unwrap().starts_with("TOTAL"),
        "a totals row: {out}"
    );
    assert!(stderr(&o).contains("no requests"), "{}", stderr(&o));
}

#[test]
fn usage_reports_the_ledger() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(run(dir, &["keys", "create", "--name", "alice"]));
    ok(run(dir, &["keys", "create", "--name", "bob"]));
    let store = Store::open(dir).unwrap();
    let day = ferrolm_accounting::time::day_start_ms("2025-11-30").unwrap();
    let row = |key_id: Option<i64>, model: &str, ts: i64, cost: f64| UsageRow {
        ts,
        request_id: format!("r{ts}"),
        key_id,
        model: model.into(),
        endpoint: "/v1/chat/completions".into(),
        status: 200,
        prompt_tokens: 10_550,
        cached_tokens: 0,
        completion_tokens: 500,
        latency_ms: 100.0,
        ttft_ms: Some(20.0),
        cost_usd: cost,
        finish_reason: Some("stop".into()),
        row_key: UsageRow::new_key().unwrap(),
        ..UsageRow::default()
    };
    store
        .record(&row(Some(1), "gpt-4o", day + 1, 0.031375))
        .unwrap();
    store
        .record(&row(Some(1), "gpt-4o", day - 1, 0.031375))
        .unwrap();
    store
        .record(&row(Some(2), "smollm2", day + 2, 0.0001))
        .unwrap();
    store.record(&row(None, "smollm2", day + 3, 0.0)).unwrap();
    drop(store);

    let v = json_of(&run(dir, &["usage", "--json", "--by", "key"]));
    let g = v["groups"].as_array().unwrap();
    let names: Vec<_> = g.iter().map(|g| g["key"].as_str().unwrap()).collect();
    assert_eq!(names, ["(no key)", "alice", "bob"]);
    assert_eq!(g[1]["requests"], 2);
    assert_eq!(g[1]["prompt_tokens"], 21_100);
    assert_eq!(v["total"]["requests"], 4);

    // One key, one day.
    let v = json_of(&run(
        dir,
        &[
            "usage",
            "--json",
            "--key",
            "alice",
            "--since",
            "2025-11-30",
            "--until",
            "2025-11-30",
        ],
    ));
    assert_eq!(v["total"]["requests"], 1);
    assert_eq!(v["total"]["cost_usd"], 0.031375);
    let g = v["groups"].as_array().unwrap();
    assert_eq!(g.len(), 1);
    assert_eq!(
        (g[0]["key"].as_str(), g[0]["model"].as_str()),
        (Some("alice"), Some("gpt-4o"))
    );

    let out = stdout(&ok(run(dir, &["usage", "--by", "day,model"])));
    assert!(
        out.contains("2025-11-29") && out.contains("2025-11-30"),
        "{out}"
    );
    let total = out.lines().last().unwrap();
    assert!(
        total.starts_with("TOTAL") && total.contains("0.062850"),
        "{out}"
    );
}

#[test]
fn data_dir_defaults_to_ferrolm_home_server() {
    let home = tempfile::tempdir().unwrap();
    let o = ferrolm()
        .env("FERROLM_HOME", home.path())
        .args(["keys", "create", "--name", "dflt"])
        .output()
        .unwrap();
    let o = ok(o);
    assert!(home.path().join("server").join("ferrolm.db").exists());
    assert!(stderr(&o).contains(&home.path().join("server").display().to_string()));
}
