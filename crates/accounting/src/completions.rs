//! Stored chat completions (`/v1/chat/completions` with `store: true`, or every chat request
//! under `ferrolm serve --store-all`): the request's messages and tools, the answer as the
//! client received it, and the caller's metadata, in the same `ferrolm.db` as the keys and the
//! ledger. They are what `ferrolm data export --stored` turns into fine-tuning data.
//!
//! Contract:
//! - A completion belongs to one key (`key_id`, NULL for open access) and every read, update and
//!   delete of the server is scoped by it: another key's completion is `None`, exactly as one that
//!   does not exist. Only the operator's export ([`Owner::Any`]) reads across keys.
//! - Metadata is at most [`MAX_METADATA_PAIRS`] string pairs, keys of at most
//!   [`MAX_METADATA_KEY_CHARS`] characters and values of at most [`MAX_METADATA_VALUE_CHARS`]
//!   (OpenAI's limits); [`check_metadata`] says which one a value breaks.
//! - Lists page by `seq` (insertion order): `after` is an id of the previous page, and an `after`
//!   that is not in the list is an error rather than a silent first page.
//! - [`Store::prune_completions`] forgets completions created before a cutoff (the server's
//!   retention limit).
//! - A PostgreSQL store keeps them the same way (`pg`), so every replica reads what any stored.

use std::collections::BTreeMap;

use rusqlite::{params, types::ToSql, OptionalExtension, Row};
use serde_json::Value;

use crate::store::{At, Store};
use crate::tuning::Page;
use crate::AccountingError;

pub(crate) const MIGRATION: &str = "
    CREATE TABLE IF NOT EXISTS chat_completions (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        id       TEXT    NOT NULL UNIQUE,          -- chatcmpl-…
        key_id   INTEGER REFERENCES api_keys(id),  -- NULL: open access
        created  INTEGER NOT NULL,                 -- unix seconds
        model    TEXT    NOT NULL,
        metadata TEXT    NOT NULL,                 -- JSON object of strings
        request  TEXT    NOT NULL,                 -- JSON: {messages, tools?}
        body     TEXT    NOT NULL                  -- JSON: the chat.completion object
    );
    CREATE INDEX IF NOT EXISTS chat_completions_key ON chat_completions(key_id, seq);
    CREATE INDEX IF NOT EXISTS chat_completions_created ON chat_completions(created);";

/// Most metadata pairs on one completion (OpenAI's limit).
pub const MAX_METADATA_PAIRS: usize = 16;
/// Longest metadata key, in characters.
pub const MAX_METADATA_KEY_CHARS: usize = 64;
/// Longest metadata value, in characters.
pub const MAX_METADATA_VALUE_CHARS: usize = 512;

/// A completion's metadata: string pairs, ordered by key.
pub type Metadata = BTreeMap<String, String>;

/// `v` as metadata (`null` is none), or what is wrong with it, naming the limit it breaks.
pub fn check_metadata(v: &Value) -> Result<Metadata, String> {
    let obj = match v {
        Value::Null => return Ok(Metadata::new()),
        Value::Object(o) => o,
        other => {
            return Err(format!(
                "metadata must be an object of string pairs, e.g. {{\"task\": \"json-reply\"}}, not {other}"
            ))
        }
    };
    if obj.len() > MAX_METADATA_PAIRS {
        return Err(format!(
            "metadata has {} pairs: at most {MAX_METADATA_PAIRS} are allowed",
            obj.len()
        ));
    }
    let mut out = Metadata::new();
    for (k, v) in obj {
        let n = k.chars().count();
        if n > MAX_METADATA_KEY_CHARS {
            return Err(format!(
                "metadata key `{}…` is {n} characters long: keys may have at most {MAX_METADATA_KEY_CHARS}",
                k.chars().take(16).collect::<String>()
            ));
        }
        let Value::String(s) = v else {
            return Err(format!(
                "metadata[{k}] is {v}: values must be strings (send \"{}\")",
                v.to_string().trim_matches('"')
            ));
        };
        let n = s.chars().count();
        if n > MAX_METADATA_VALUE_CHARS {
            return Err(format!(
                "metadata[{k}] is {n} characters long: values may have at most {MAX_METADATA_VALUE_CHARS}"
            ));
        }
        out.insert(k.clone(), s.clone());
    }
    Ok(out)
}

/// A stored chat completion.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRecord {
    /// The answer's id, `chatcmpl-…`.
    pub id: String,
    pub key_id: Option<i64>,
    /// Unix seconds.
    pub created: i64,
    /// The model that answered.
    pub model: String,
    pub metadata: Metadata,
    /// The request's `messages`, as sent.
    pub messages: Value,
    /// The request's `tools`, if it had any.
    pub tools: Option<Value>,
    /// The `chat.completion` object as answered (choices with their logprobs, usage).
    pub body: Value,
}

/// Whose completions a query reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// One key's (`None`: requests made without a key).
    Key(Option<i64>),
    /// Every key's: the operator's export.
    Any,
}

/// A page of completions: filters, then `limit` of them after `after` in `order`.
#[derive(Clone, Debug)]
pub struct CompletionQuery {
    pub owner: Owner,
    pub model: Option<String>,
    /// Every pair must match.
    pub metadata: Vec<(String, String)>,
    /// An id of the previous page.
    pub after: Option<String>,
    pub limit: usize,
    /// Oldest first (`order=asc`); else newest first.
    pub ascending: bool,
}

impl CompletionQuery {
    /// `owner`'s completions, oldest first, 100 a page, unfiltered.
    pub fn all(owner: Owner) -> Self {
        CompletionQuery {
            owner,
            model: None,
            metadata: Vec::new(),
            after: None,
            limit: 100,
            ascending: true,
        }
    }
}

const COLUMNS: &str = "id, key_id, created, model, metadata, request, body";

fn json(i: usize, text: String) -> rusqlite::Result<Value> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<CompletionRecord> {
    let metadata = json(4, r.get(4)?)?;
    let metadata = serde_json::from_value(metadata).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let request = json(5, r.get(5)?)?;
    Ok(CompletionRecord {
        id: r.get(0)?,
        key_id: r.get(1)?,
        created: r.get(2)?,
        model: r.get(3)?,
        metadata,
        messages: request.get("messages").cloned().unwrap_or(Value::Null),
        tools: request.get("tools").cloned().filter(|t| !t.is_null()),
        body: json(6, r.get(6)?)?,
    })
}

/// A record from the stored columns ([`COLUMNS`]' JSON texts), for the PostgreSQL store.
pub(crate) fn from_texts(
    (id, key_id, created, model): (String, Option<i64>, i64, String),
    [metadata, request, body]: [String; 3],
) -> Result<CompletionRecord, serde_json::Error> {
    let request: Value = serde_json::from_str(&request)?;
    Ok(CompletionRecord {
        id,
        key_id,
        created,
        model,
        metadata: serde_json::from_str(&metadata)?,
        messages: request.get("messages").cloned().unwrap_or(Value::Null),
        tools: request.get("tools").cloned().filter(|t| !t.is_null()),
        body: serde_json::from_str(&body)?,
    })
}

pub(crate) fn metadata_text(m: &Metadata) -> String {
    serde_json::to_string(m).unwrap_or_else(|_| "{}".into())
}

/// The stored `request` column: the messages and tools.
pub(crate) fn request_text(c: &CompletionRecord) -> String {
    let mut request = serde_json::json!({"messages": c.messages});
    if let Some(t) = &c.tools {
        request["tools"] = t.clone();
    }
    request.to_string()
}

impl Store {
    /// Keep `c`. Its id must be new.
    pub fn insert_completion(&self, c: &CompletionRecord) -> Result<(), AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.insert_completion(c);
        }
        self.conn()?
            .execute(
                &format!(
                    "INSERT INTO chat_completions ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ),
                params![
                    c.id,
                    c.key_id,
                    c.created,
                    c.model,
                    metadata_text(&c.metadata),
                    request_text(c),
                    c.body.to_string()
                ],
            )
            .at(&self.path)?;
        Ok(())
    }

    /// The completion `id` if it belongs to `key`.
    pub fn completion(
        &self,
        id: &str,
        key: Option<i64>,
    ) -> Result<Option<CompletionRecord>, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.completion(id, key);
        }
        self.conn()?
            .query_row(
                &format!("SELECT {COLUMNS} FROM chat_completions WHERE id = ?1 AND key_id IS ?2"),
                params![id, key],
                from_row,
            )
            .optional()
            .at(&self.path)
    }

    /// One page of the completions `q` selects.
    pub fn completions(
        &self,
        q: &CompletionQuery,
    ) -> Result<Page<CompletionRecord>, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.completions(q);
        }
        let mut sql = format!("SELECT {COLUMNS} FROM chat_completions WHERE 1");
        let mut args: Vec<Box<dyn ToSql>> = Vec::new();
        if let Owner::Key(k) = q.owner {
            sql.push_str(" AND key_id IS ?");
            args.push(Box::new(k));
        }
        if let Some(m) = &q.model {
            sql.push_str(" AND model = ?");
            args.push(Box::new(m.clone()));
        }
        for (k, v) in &q.metadata {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM json_each(metadata) WHERE json_each.key = ? AND json_each.value = ?)",
            );
            args.push(Box::new(k.clone()));
            args.push(Box::new(v.clone()));
        }
        let conn = self.conn()?;
        if let Some(a) = &q.after {
            let mut find = String::from("SELECT seq FROM chat_completions WHERE id = ?1");
            let key = match q.owner {
                Owner::Key(k) => {
                    find.push_str(" AND key_id IS ?2");
                    k
                }
                Owner::Any => None,
            };
            let seq: Option<i64> = match q.owner {
                Owner::Key(_) => conn.query_row(&find, params![a, key], |r| r.get(0)),
                Owner::Any => conn.query_row(&find, params![a], |r| r.get(0)),
            }
            .optional()
            .at(&self.path)?;
            let Some(seq) = seq else {
                return Err(AccountingError::InvalidQuery(format!(
                    "after: `{a}` is not the id of a stored completion in this list"
                )));
            };
            sql.push_str(if q.ascending {
                " AND seq > ?"
            } else {
                " AND seq < ?"
            });
            args.push(Box::new(seq));
        }
        sql.push_str(if q.ascending {
            " ORDER BY seq ASC LIMIT ?"
        } else {
            " ORDER BY seq DESC LIMIT ?"
        });
        args.push(Box::new(q.limit as i64 + 1));
        let mut st = conn.prepare(&sql).at(&self.path)?;
        let refs: Vec<&dyn ToSql> = args.iter().map(AsRef::as_ref).collect();
        let mut items = st
            .query_map(refs.as_slice(), from_row)
            .at(&self.path)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .at(&self.path)?;
        let has_more = items.len() > q.limit;
        items.truncate(q.limit);
        Ok(Page { items, has_more })
    }

    /// Replace the metadata of `key`'s completion `id`; the updated completion, or `None` when
    /// it has none such.
    pub fn update_completion_metadata(
        &self,
        id: &str,
        key: Option<i64>,
        metadata: &Metadata,
    ) -> Result<Option<CompletionRecord>, AccountingError> {
        if let Some(pg) = self.pg() {
            if !pg.update_completion_metadata(id, key, metadata_text(metadata))? {
                return Ok(None);
            }
            return self.completion(id, key);
        }
        let n = self
            .conn()?
            .execute(
                "UPDATE chat_completions SET metadata = ?3 WHERE id = ?1 AND key_id IS ?2",
                params![id, key, metadata_text(metadata)],
            )
            .at(&self.path)?;
        if n == 0 {
            return Ok(None);
        }
        self.completion(id, key)
    }

    /// Forget `key`'s completion `id`; false when it had none such.
    pub fn delete_completion(&self, id: &str, key: Option<i64>) -> Result<bool, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.delete_completion(id, key);
        }
        let n = self
            .conn()?
            .execute(
                "DELETE FROM chat_completions WHERE id = ?1 AND key_id IS ?2",
                params![id, key],
            )
            .at(&self.path)?;
        Ok(n > 0)
    }

    /// Forget every completion created before `cutoff` (unix seconds); how many went.
    pub fn prune_completions(&self, cutoff: i64) -> Result<usize, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.prune_completions(cutoff);
        }
        self.conn()?
            .execute("DELETE FROM chat_completions WHERE created < ?1", [cutoff])
            .at(&self.path)
    }
}

/// One fine-tuning example per choice of `c`, in OpenAI's chat fine-tuning format: the request's
/// messages followed by the stored reply as an assistant message (`content`, and `tool_calls`
/// when it called tools), plus the request's `tools` when it had any. With `with_logprobs`, a
/// line also carries `logprobs`: the reply's tokens as OpenAI's `choices[].logprobs.content`
/// reports them, `[{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
/// "bytes"}]}]`, and a choice stored without log-probs gives no line. Returns the lines and how
/// many choices were left out for want of log-probs.
pub fn sft_lines(c: &CompletionRecord, with_logprobs: bool) -> (Vec<Value>, usize) {
    let (mut lines, mut skipped) = (Vec::new(), 0);
    let Some(prompt) = c.messages.as_array() else {
        return (lines, skipped);
    };
    for choice in c
        .body
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(m) = choice.get("message") else {
            continue;
        };
        let mut reply = serde_json::json!({"role": "assistant", "content": m.get("content").cloned().unwrap_or(Value::Null)});
        if let Some(calls) = m
            .get("tool_calls")
            .and_then(Value::as_array)
            .filter(|c| !c.is_empty())
        {
            let calls: Vec<Value> = calls
                .iter()
                .map(|call| {
                    let mut call = call.clone();
                    if let Some(o) = call.as_object_mut() {
                        o.remove("index");
                    }
                    call
                })
                .collect();
            reply["tool_calls"] = Value::Array(calls);
        }
        let mut messages = prompt.clone();
        messages.push(reply);
        let mut line = serde_json::json!({"messages": messages});
        if let Some(t) = &c.tools {
            line["tools"] = t.clone();
        }
        if with_logprobs {
            match choice.pointer("/logprobs/content").filter(|l| l.is_array()) {
                Some(l) => line["logprobs"] = l.clone(),
                None => {
                    skipped += 1;
                    continue;
                }
            }
        }
        lines.push(line);
    }
    (lines, skipped)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(
        id: &str,
        key: Option<i64>,
        model: &str,
        created: i64,
        meta: &[(&str, &str)],
    ) -> CompletionRecord {
        CompletionRecord {
            id: id.into(),
            key_id: key,
            created,
            model: model.into(),
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            messages: json!([{"role": "user", "content": id}]),
            tools: None,
            body: json!({"id": id, "object": "chat.completion"}),
        }
    }

    fn ids(p: &Page<CompletionRecord>) -> Vec<&str> {
        p.items.iter().map(|c| c.id.as_str()).collect()
    }

    #[test]
    fn completions_filter_page_and_stay_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (k, _) = s
            .create_key(&crate::KeySpec {
                name: "a".into(),
                ..Default::default()
            })
            .unwrap();
        s.insert_completion(&rec("c1", None, "m1", 10, &[("task", "x")]))
            .unwrap();
        s.insert_completion(&rec("c2", None, "m2", 20, &[("task", "y")]))
            .unwrap();
        s.insert_completion(&rec("c3", None, "m1", 30, &[("task", "x"), ("v", "2")]))
            .unwrap();
        let mut theirs = rec("c4", Some(k.id), "m1", 40, &[("task", "x")]);
        theirs.tools = Some(json!([{"type": "function"}]));
        s.insert_completion(&theirs).unwrap();
        assert!(
            s.insert_completion(&rec("c1", None, "m1", 50, &[]))
                .is_err(),
            "ids are unique"
        );

        let mut q = CompletionQuery::all(Owner::Key(None));
        assert_eq!(ids(&s.completions(&q).unwrap()), ["c1", "c2", "c3"]);
        q.ascending = false;
        q.limit = 2;
        let p = s.completions(&q).unwrap();
        assert_eq!((ids(&p), p.has_more), (vec!["c3", "c2"], true));
        q.after = Some("c2".into());
        let p = s.completions(&q).unwrap();
        assert_eq!((ids(&p), p.has_more), (vec!["c1"], false));
        q.after = Some("c4".into());
        assert!(
            matches!(s.completions(&q), Err(AccountingError::InvalidQuery(_))),
            "another key's id is not in this list"
        );
        let q = CompletionQuery {
            model: Some("m1".into()),
            metadata: vec![("task".into(), "x".into())],
            ..CompletionQuery::all(Owner::Key(None))
        };
        assert_eq!(ids(&s.completions(&q).unwrap()), ["c1", "c3"]);
        let q = CompletionQuery {
            metadata: vec![("task".into(), "x".into()), ("v".into(), "2".into())],
            ..CompletionQuery::all(Owner::Any)
        };
        assert_eq!(ids(&s.completions(&q).unwrap()), ["c3"]);
        let q = CompletionQuery {
            model: Some("m1".into()),
            ..CompletionQuery::all(Owner::Any)
        };
        assert_eq!(ids(&s.completions(&q).unwrap()), ["c1", "c3", "c4"]);

        assert_eq!(s.completion("c4", None).unwrap(), None);
        assert_eq!(s.completion("c4", Some(k.id)).unwrap(), Some(theirs));
        let m: Metadata = [("task".to_owned(), "z".to_owned())].into();
        assert_eq!(s.update_completion_metadata("c4", None, &m).unwrap(), None);
        let up = s
            .update_completion_metadata("c1", None, &m)
            .unwrap()
            .unwrap();
        assert_eq!(up.metadata, m);
        assert!(!s.delete_completion("c1", Some(k.id)).unwrap());
        assert!(s.delete_completion("c1", None).unwrap());
        assert!(!s.delete_completion("c1", None).unwrap());
        assert_eq!(
            s.prune_completions(30).unwrap(),
            1,
            "c2 (created 20) goes, c3 (30) stays"
        );
        let all = s.completions(&CompletionQuery::all(Owner::Any)).unwrap();
        assert_eq!(ids(&all), ["c3", "c4"]);
    }

    #[test]
    fn metadata_over_the_limits_is_refused_with_the_limit_named() {
        assert_eq!(check_metadata(&Value::Null).unwrap(), Metadata::new());
        assert!(check_metadata(&json!({"a": "b"})).is_ok());
        let many: serde_json::Map<String, Value> =
            (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        let e = check_metadata(&Value::Object(many)).unwrap_err();
        assert!(e.contains("17 pairs") && e.contains("16"), "{e}");
        let e = check_metadata(&json!({"k".repeat(65): "v"})).unwrap_err();
        assert!(e.contains("65 characters") && e.contains("64"), "{e}");
        assert!(check_metadata(&json!({"k".repeat(64): "v".repeat(512)})).is_ok());
        let e = check_metadata(&json!({"k": "v".repeat(513)})).unwrap_err();
        assert!(e.contains("513 characters") && e.contains("512"), "{e}");
        let e = check_metadata(&json!({"k": 3})).unwrap_err();
        assert!(e.contains("strings"), "{e}");
        assert!(check_metadata(&json!(["a"])).is_err());
    }

    #[test]
    fn sft_lines_append_the_reply_and_keep_logprobs_when_asked() {
        let mut c = rec("c1", None, "m", 1, &[]);
        c.tools = Some(json!([{"type": "function", "function": {"name": "f"}}]));
        c.body = json!({"choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi", "refusal": null},
             "logprobs": {"content": [{"token": "hi", "logprob": -0.5, "bytes": [104, 105], "top_logprobs": []}]}},
            {"index": 1, "message": {"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
             "logprobs": null},
        ]});
        let (lines, skipped) = sft_lines(&c, false);
        assert_eq!(skipped, 0);
        assert_eq!(
            lines[0],
            json!({"messages": [{"role": "user", "content": "c1"}, {"role": "assistant", "content": "hi"}], "tools": c.tools})
        );
        assert_eq!(
            lines[1]["messages"][1],
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
        );
        let (lines, skipped) = sft_lines(&c, true);
        assert_eq!((lines.len(), skipped), (1, 1));
        assert_eq!(lines[0]["logprobs"][0]["logprob"], json!(-0.5));
    }
}
