//! Stored Responses (`/v1/responses` with `store: true`): in the same `ferrolm.db` as the keys
//! and the ledger, so `previous_response_id`, retrieve, delete and `input_items` outlive a
//! restart.
//!
//! Contract:
//! - A response belongs to one key (`key_id`, NULL for open access) and every read is scoped by
//!   it: another key's response is `None`, exactly as one that does not exist (or was deleted).
//! - A response's input items are the whole conversation it answered (a `previous_response_id`
//!   chain already resolved), so a chain is read back with one row, never by walking it.
//! - Items are JSON documents with an `id`; their shape is the server's, this module only keeps
//!   them, in order. Deleting a response deletes its items in the same transaction.
//! - A PostgreSQL store keeps them the same way (`pg`), so a `previous_response_id` made on one
//!   replica continues on any other.

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use crate::store::{At, Store};
use crate::AccountingError;

pub(crate) const MIGRATION: &str = "
    CREATE TABLE responses (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        id         TEXT    NOT NULL UNIQUE,          -- resp_…
        key_id     INTEGER REFERENCES api_keys(id),
        created_at INTEGER NOT NULL,                 -- unix seconds
        body       TEXT    NOT NULL                  -- JSON: the response object
    );
    CREATE INDEX responses_key ON responses(key_id, seq);
    CREATE TABLE response_items (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        response_id TEXT    NOT NULL REFERENCES responses(id),
        item_id     TEXT    NOT NULL,                -- msg_…, fc_…, fco_…
        kind        TEXT    NOT NULL CHECK (kind IN ('input', 'output')),
        item        TEXT    NOT NULL                 -- JSON
    );
    CREATE INDEX response_items_response ON response_items(response_id, seq);
    CREATE INDEX response_items_id ON response_items(item_id);";

/// A stored response: the object as answered, and the conversation it answered.
#[derive(Clone, Debug, PartialEq)]
pub struct ResponseRecord {
    pub id: String,
    pub key_id: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
    /// The response object.
    pub body: Value,
    /// Every input item, in order (a chain's earlier turns first).
    pub input: Vec<Value>,
    /// The output items, in order.
    pub output: Vec<Value>,
}

fn json_text(v: &Value) -> String {
    v.to_string()
}

/// The stored `item_id` of an item: its `id` (empty when it has none).
pub(crate) fn item_id(item: &Value) -> &str {
    item.get("id").and_then(Value::as_str).unwrap_or_default()
}

/// Stored items, each `(kind, item)` in order, split into the record's input and output.
pub(crate) fn split_items(items: impl IntoIterator<Item = (String, Value)>) -> [Vec<Value>; 2] {
    let (mut input, mut output) = (Vec::new(), Vec::new());
    for (kind, item) in items {
        if kind == "input" {
            input.push(item);
        } else {
            output.push(item);
        }
    }
    [input, output]
}

fn parse(i: usize, text: String) -> rusqlite::Result<Value> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

impl Store {
    /// Keep `r` and its items (one transaction).
    pub fn insert_response(&self, r: &ResponseRecord) -> Result<(), AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.insert_response(r);
        }
        let mut conn = self.conn()?;
        let tx = conn.transaction().at(&self.path)?;
        tx.execute(
            "INSERT INTO responses (id, key_id, created_at, body) VALUES (?1, ?2, ?3, ?4)",
            params![r.id, r.key_id, r.created_at, json_text(&r.body)],
        )
        .at(&self.path)?;
        for (kind, items) in [("input", &r.input), ("output", &r.output)] {
            for item in items {
                tx.execute(
                    "INSERT INTO response_items (response_id, item_id, kind, item) VALUES (?1, ?2, ?3, ?4)",
                    params![r.id, item_id(item), kind, json_text(item)],
                )
                .at(&self.path)?;
            }
        }
        tx.commit().at(&self.path)
    }

    /// The response `id` if it belongs to `key`.
    pub fn response(
        &self,
        id: &str,
        key: Option<i64>,
    ) -> Result<Option<ResponseRecord>, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.response(id, key);
        }
        let conn = self.conn()?;
        let row = conn
            .query_row(
                "SELECT created_at, body FROM responses WHERE id = ?1 AND key_id IS ?2",
                params![id, key],
                |r| Ok((r.get::<_, i64>(0)?, parse(1, r.get(1)?)?)),
            )
            .optional()
            .at(&self.path)?;
        let Some((created_at, body)) = row else {
            return Ok(None);
        };
        let mut st = conn
            .prepare("SELECT kind, item FROM response_items WHERE response_id = ?1 ORDER BY seq")
            .at(&self.path)?;
        let rows = st
            .query_map([id], |r| Ok((r.get::<_, String>(0)?, parse(1, r.get(1)?)?)))
            .at(&self.path)?;
        let items = rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)?;
        let [input, output] = split_items(items);
        Ok(Some(ResponseRecord {
            id: id.to_owned(),
            key_id: key,
            created_at,
            body,
            input,
            output,
        }))
    }

    /// The item `item_id` of any of `key`'s stored responses (for an `item_reference`).
    pub fn response_item(
        &self,
        item_id: &str,
        key: Option<i64>,
    ) -> Result<Option<Value>, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.response_item(item_id, key);
        }
        self.conn()?
            .query_row(
                "SELECT i.item FROM response_items i JOIN responses r ON r.id = i.response_id
                 WHERE i.item_id = ?1 AND r.key_id IS ?2 ORDER BY i.seq DESC LIMIT 1",
                params![item_id, key],
                |r| parse(0, r.get(0)?),
            )
            .optional()
            .at(&self.path)
    }

    /// Forget the response `id` of `key` and its items; false when there was none.
    pub fn delete_response(&self, id: &str, key: Option<i64>) -> Result<bool, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.delete_response(id, key);
        }
        let mut conn = self.conn()?;
        let tx = conn.transaction().at(&self.path)?;
        // Items first: they reference the response (foreign keys are on).
        tx.execute(
            "DELETE FROM response_items WHERE response_id = ?1
             AND EXISTS (SELECT 1 FROM responses WHERE id = ?1 AND key_id IS ?2)",
            params![id, key],
        )
        .at(&self.path)?;
        let n = tx
            .execute(
                "DELETE FROM responses WHERE id = ?1 AND key_id IS ?2",
                params![id, key],
            )
            .at(&self.path)?;
        tx.commit().at(&self.path)?;
        Ok(n > 0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_response_is_seen_only_by_its_key_and_deleting_it_forgets_its_items() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let r = ResponseRecord {
            id: "resp_1".into(),
            key_id: None,
            created_at: 5,
            body: json!({"id": "resp_1"}),
            input: vec![json!({"id": "msg_a", "type": "message"})],
            output: vec![json!({"id": "msg_b", "type": "message"})],
        };
        s.insert_response(&r).unwrap();
        assert_eq!(s.response("resp_1", None).unwrap(), Some(r));
        assert_eq!(s.response("resp_1", Some(7)).unwrap(), None);
        assert!(s.response_item("msg_b", None).unwrap().is_some());
        assert!(s.response_item("msg_b", Some(7)).unwrap().is_none());
        assert!(!s.delete_response("resp_1", Some(7)).unwrap());
        assert!(s.delete_response("resp_1", None).unwrap());
        assert_eq!(s.response("resp_1", None).unwrap(), None);
        assert!(s.response_item("msg_b", None).unwrap().is_none());
    }
}
