//! OpenAI's `/v1/files`: upload (multipart `file` + `purpose`), list, get, content, delete.
//!
//! Only `purpose = fine-tune` is taken (the server has nothing else to do with a file), and
//! such a file is validated as chat fine-tuning JSONL before it is kept: a bad one is a 400
//! that names its lines. The bytes go to the blob store (`--blobs`: `files/<id>` in the data dir
//! or in S3, see `blobs`), written whole or not at all; the metadata goes to the store after
//! that (a row never names a missing blob: a failed blob write leaves no row). Deleting a file
//! deletes its row, then its blob. Files belong to the key that uploaded them: another key's
//! file is "no such file".

use axum::body::Bytes;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ferrolm_accounting::FileRecord;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::blobs::BlobError;
use crate::error::ApiError;
use crate::tuner::{file_key, unix_s, FileFormat, Tuner};
use crate::AppState;

/// The largest file accepted.
pub const MAX_FILE_BYTES: usize = 64 * 1024 * 1024;

/// The tuner, or a 404 saying that this server does not fine-tune.
pub fn tuner(s: &AppState) -> Result<&Tuner, ApiError> {
    s.tuning.get().ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        code: Some("unknown_url"),
        ..ApiError::invalid(
            "this server has no files or fine-tuning (it runs without a data dir for them)",
            None,
        )
    })
}

fn too_large() -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        ..ApiError::invalid(
            format!(
                "the file is larger than the {} MiB this server takes: split the training data, or keep fewer examples",
                MAX_FILE_BYTES >> 20
            ),
            Some("file"),
        )
    }
}

pub fn file_object(f: &FileRecord) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": null,
        "expires_at": null,
    })
}

/// 404 for a file id that is not the caller's (or does not exist: the same answer).
pub fn no_file(id: &str, param: Option<&'static str>) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: Some("file_not_found"),
        ..ApiError::invalid(
            format!("no file `{id}`: upload it with POST /v1/files (GET /v1/files lists yours)"),
            param,
        )
    }
}

/// Check a fine-tune file in `format`; `Ok(examples)` or a 400 naming its bad lines.
pub fn validate(
    t: &Tuner,
    bytes: &[u8],
    format: &FileFormat,
    param: &'static str,
) -> Result<usize, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::invalid(
            format!(
                "the file is not UTF-8 text (byte {}): fine-tuning files are JSONL",
                e.valid_up_to()
            ),
            Some(param),
        )
    })?;
    match (t.hooks.validate)(text, format) {
        Ok(0) => Err(ApiError::invalid(
            "the file has no examples: write one {\"messages\": [...]} object per line",
            Some(param),
        )),
        Ok(n) => Ok(n),
        Err(lines) => {
            let more = lines.len().saturating_sub(10);
            let what = match format {
                FileFormat::Chat => "chat fine-tuning JSONL",
                FileFormat::Preference => "preference (DPO) fine-tuning JSONL",
                FileFormat::Reinforcement(_) => "reinforcement fine-tuning JSONL",
                FileFormat::Either => "fine-tuning JSONL (chat, preference or reinforcement)",
            };
            let mut m = format!(
                "the file is not valid {what}: {}",
                lines
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            if more > 0 {
                m.push_str(&format!("; and {more} more bad lines"));
            }
            Err(ApiError::invalid(m, Some(param)).with_code("invalid_file_format"))
        }
    }
}

/// A blob store failure as an answer: 404 for a recorded file whose blob is gone, else 503
/// (the object store may be back soon) with what failed and how to fix it.
fn blob_error(e: BlobError) -> ApiError {
    let status = if e.is_not_found() {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut err = ApiError::server(status, e.to_string());
    err.code = Some("blob_store_failed");
    err
}

pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:08x}",
        crate::random_seed(),
        crate::random_seed() as u32
    )
}

/// `POST /v1/files`.
pub async fn upload(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    mut form: Multipart,
) -> Result<Json<Value>, ApiError> {
    tuner(&s)?;
    let (mut file, mut purpose): (Option<(String, Bytes)>, Option<String>) = (None, None);
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(too_large()),
            Err(e) => {
                return Err(ApiError::invalid(
                    format!("the multipart body is malformed: {e}"),
                    None,
                ))
            }
        };
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().map(str::to_owned);
        let data = field.bytes().await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiError::invalid(format!("cannot read the field `{name}`: {e}"), None)
            }
        })?;
        match name.as_str() {
            "file" => file = Some((filename.unwrap_or_else(|| "upload.jsonl".into()), data)),
            "purpose" => purpose = Some(String::from_utf8_lossy(&data).trim().to_owned()),
            _ => {}
        }
    }
    let Some((filename, data)) = file else {
        return Err(ApiError::invalid(
            "no `file` field: send the file as multipart/form-data with `file` and `purpose`",
            Some("file"),
        ));
    };
    match purpose.as_deref() {
        Some("fine-tune") => {}
        None => {
            return Err(ApiError::invalid(
                "no `purpose` field: send purpose=fine-tune",
                Some("purpose"),
            ))
        }
        Some(p) => {
            return Err(ApiError::invalid(
                format!("purpose `{p}` is not supported here: this server takes files for fine-tuning only (purpose=fine-tune)"),
                Some("purpose"),
            ))
        }
    }
    let rec = keep(&s, &caller, filename, data).await?;
    Ok(Json(file_object(&rec)))
}

/// Validate `data` as chat fine-tuning JSONL and keep it as the caller's `purpose=fine-tune`
/// file (an upload, or an export of stored completions).
pub async fn keep(
    s: &AppState,
    caller: &Caller,
    filename: String,
    data: Bytes,
) -> Result<FileRecord, ApiError> {
    if data.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    let rec = FileRecord {
        id: new_id("file"),
        key_id: caller.key_id(),
        bytes: data.len() as u64,
        created_at: unix_s(),
        filename,
        purpose: "fine-tune".into(),
    };
    let state = s.clone();
    let checked = data.clone();
    tokio::task::spawn_blocking(move || -> Result<usize, ApiError> {
        validate(tuner(&state)?, &checked, &FileFormat::Either, "file")
    })
    .await
    .map_err(|e| ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    // The blob first, whole: the row that names it is written only once it is there.
    let t = tuner(s)?;
    let key = file_key(&rec.id);
    t.blobs.put(&key, data).await.map_err(blob_error)?;
    if let Err(e) = s.access.store.insert_file(&rec) {
        if let Err(del) = t.blobs.delete(&key).await {
            eprintln!("ferrolm serve: could not remove the unrecorded blob {key}: {del}");
        }
        return Err(ApiError::storage(e));
    }
    Ok(rec)
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    purpose: Option<String>,
}

/// `GET /v1/files`: the caller's files, newest first.
pub async fn list(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    tuner(&s)?;
    let files = s
        .access
        .store
        .files(caller.key_id())
        .map_err(ApiError::storage)?;
    let data: Vec<Value> = files
        .iter()
        .filter(|f| q.purpose.as_deref().is_none_or(|p| p == f.purpose))
        .map(file_object)
        .collect();
    Ok(Json(
        json!({"object": "list", "data": data, "has_more": false}),
    ))
}

fn own_file(s: &AppState, caller: &Caller, id: &str) -> Result<FileRecord, ApiError> {
    s.access
        .store
        .file(id, caller.key_id())
        .map_err(ApiError::storage)?
        .ok_or_else(|| no_file(id, None))
}

/// `GET /v1/files/{id}`.
pub async fn get_one(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    tuner(&s)?;
    Ok(Json(file_object(&own_file(&s, &caller, &id)?)))
}

/// `GET /v1/files/{id}/content`: the bytes as uploaded.
pub async fn content(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let t = tuner(&s)?;
    let f = own_file(&s, &caller, &id)?;
    let bytes = t.blobs.get(&file_key(&f.id)).await.map_err(blob_error)?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// `DELETE /v1/files/{id}`.
pub async fn delete(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let t = tuner(&s)?;
    if !s
        .access
        .store
        .delete_file(&id, caller.key_id())
        .map_err(ApiError::storage)?
    {
        return Err(no_file(&id, None));
    }
    // The row is gone first: a crash here leaves an orphan blob, never a row without one.
    if let Err(e) = t.blobs.delete(&file_key(&id)).await {
        eprintln!("ferrolm serve: could not remove the deleted file's blob: {e}");
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}
