//! Key administration over HTTP (a ferrolm extension, what the web UI's server page uses), for
//! admin keys only (`ferrolm keys create --admin`):
//!
//! - `GET /v1/keys`: every key, revoked ones included, with `active` and `spent_usd` (never a
//!   secret), as `ferrolm keys list --json` prints them;
//! - `POST /v1/keys` `{"name", "rpm"?, "tpm"?, "budget_usd"?, "admin"?}`: a new key, with its
//!   `secret` shown this once (only its hash is stored);
//! - `DELETE /v1/keys/{id}`: revoke the key; its usage stays in the ledger.
//!
//! The rules (names, limits, one active key per name) are the store's, the same for
//! `ferrolm keys`: this module only checks who asks and maps the store's errors to statuses.
//! Any other caller gets 403 with how to get an admin key; so does an open server (no keys
//! yet), whose first key is made with the CLI, on the server.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use ferrolm_accounting::{AccountingError, KeySpec, NewKey};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::{parse, AppState};

/// 403 unless the caller's key is an admin key.
fn admin_only(caller: &Caller) -> Result<(), ApiError> {
    let message = match &caller.key {
        Some(k) if k.admin => return Ok(()),
        Some(k) => format!(
            "the key `{}` is not an admin key, and only admin keys may manage keys: use one made with `ferrolm keys create --admin`",
            k.name
        ),
        None => "this server runs without keys, so no one may manage keys over the API: create the first (admin) key on the server with `ferrolm keys create --admin --data-dir DIR --name NAME`".to_owned(),
    };
    Err(ApiError {
        status: StatusCode::FORBIDDEN,
        kind: "permission_error",
        code: Some("admin_key_required"),
        ..ApiError::invalid(message, None)
    })
}

/// The store's refusals as the client's errors; failures of the store itself as 500/503.
fn refused(e: AccountingError) -> ApiError {
    let status = match &e {
        AccountingError::InvalidKeySpec { .. } | AccountingError::AmbiguousKey { .. } => {
            StatusCode::BAD_REQUEST
        }
        AccountingError::DuplicateName(_) | AccountingError::AlreadyRevoked { .. } => {
            StatusCode::CONFLICT
        }
        AccountingError::UnknownKey(_) => StatusCode::NOT_FOUND,
        _ => return ApiError::storage(e),
    };
    ApiError {
        status,
        ..ApiError::invalid(e.to_string(), None)
    }
}

/// `GET /v1/keys`.
pub async fn list(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    admin_only(&caller)?;
    let keys = s.access.store.key_listing().map_err(refused)?;
    Ok(Json(json!({"object": "list", "data": keys})))
}

/// `POST /v1/keys`.
pub async fn create(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<(StatusCode, Json<NewKey>), ApiError> {
    admin_only(&caller)?;
    let spec: KeySpec = parse(&body)?;
    let (key, secret) = s.access.store.create_key(&spec).map_err(refused)?;
    Ok((StatusCode::CREATED, Json(NewKey { key, secret })))
}

/// `DELETE /v1/keys/{id}` (an id or an active key's name).
pub async fn revoke(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin_only(&caller)?;
    let key = s.access.store.revoke_key(&id).map_err(refused)?;
    Ok(Json(json!({"object": "key.revoked", "key": key})))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrolm_accounting::KeyInfo;

    fn caller(admin: Option<bool>) -> Caller {
        Caller {
            request_id: "req".into(),
            key: admin.map(|admin| KeyInfo {
                id: 1,
                name: "k".into(),
                prefix: "flm-abcd".into(),
                rpm: None,
                tpm: None,
                budget_usd: None,
                created: 0,
                revoked: None,
                admin,
            }),
            cache_scope: 0,
            started: std::time::Instant::now(),
        }
    }

    #[test]
    fn only_admin_keys_manage_keys_and_the_others_are_told_how() {
        assert!(admin_only(&caller(Some(true))).is_ok());
        let e = admin_only(&caller(Some(false))).err();
        assert!(e.as_ref().is_some_and(|e| e.status == StatusCode::FORBIDDEN
            && e.message.contains("`k` is not an admin key")
            && e.message.contains("--admin")));
        let e = admin_only(&caller(None)).err();
        assert!(e.is_some_and(|e| e.status == StatusCode::FORBIDDEN
            && e.message.contains("ferrolm keys create --admin")));
    }

    #[test]
    fn the_stores_refusals_keep_their_message_with_a_client_status() {
        let e = refused(AccountingError::DuplicateName("ci".into()));
        assert_eq!(e.status, StatusCode::CONFLICT);
        let e = refused(AccountingError::UnknownKey("7".into()));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.message.contains("`7`"));
    }
}
