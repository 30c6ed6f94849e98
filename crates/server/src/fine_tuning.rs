//! OpenAI's `/v1/fine_tuning/jobs`: create, list, get, events, checkpoints, cancel, pause,
//! resume. The handlers check the request and write the store, which is the queue; the worker
//! of this server or of another replica sharing the store (see `tuner`) claims and trains.
//!
//! A job's settings: `hyperparameters` at the top level (OpenAI's older shape) and/or in
//! `method.supervised.hyperparameters` or `method.dpo.hyperparameters` (the newer one, which
//! wins field by field); each of `n_epochs`, `batch_size`, `learning_rate_multiplier` (and
//! DPO's `beta`) is a number or `"auto"`. "auto" is 3 epochs, a batch of min(4, examples), a
//! multiplier of 1 (LoRA lr 2e-4 × multiplier; DPO 2e-5 × multiplier) and beta 0.1. The job
//! object reports the resolved values. `method.type` `dpo` trains on preference files
//! (`input`, `preferred_output`, `non_preferred_output` per line). `reinforcement` trains on
//! prompt files (`messages` up to the turn to answer, plus the fields its grader reads) with
//! `method.reinforcement.grader` (string_check, text_similarity, score_model with a local
//! model, multi), checked when the job is created; its hyperparameters add
//! `compute_multiplier` (samples per prompt: 4 × it, at least 2) and `eval_interval` (steps
//! between evaluations), and the LoRA lr is 5e-5 × the multiplier.
//!
//! Statuses: `validating_files` → `queued` → `running` → `succeeded` | `failed` | `cancelled`;
//! `paused` (from queued or running, keeping the checkpoints) → `queued` again on resume.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use ferrolm_accounting::{JobCheckpoint, JobEvent, JobRecord};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::blobs::BlobError;
use crate::error::ApiError;
use crate::files::{new_id, no_file, tuner, validate};
use crate::tuner::{hyper, log_event, unix_s, FileFormat, JobMethod, Tuner};
use crate::{parse, AppState};

#[derive(Debug, Deserialize)]
struct CreateJob {
    model: String,
    training_file: String,
    validation_file: Option<String>,
    hyperparameters: Option<Value>,
    method: Option<Value>,
    suffix: Option<String>,
    seed: Option<u64>,
    metadata: Option<Value>,
    /// Weights & Biases and the like: none here.
    integrations: Option<Vec<Value>>,
}

/// `Some(x)` for a number, `None` for absent / null / "auto".
fn setting(h: &Value, name: &'static str) -> Result<Option<f64>, ApiError> {
    match h.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(v) => Err(ApiError::invalid(
            format!("hyperparameters.{name} is {v}: give a number or \"auto\""),
            Some("hyperparameters"),
        )),
    }
}

/// The job's method, from `method.type` (absent: supervised); a reinforcement job's grader
/// is checked by `grader`.
fn method_of(req: &CreateJob, grader: &crate::tuner::GraderCheck) -> Result<JobMethod, ApiError> {
    let Some(m) = &req.method else {
        return Ok(JobMethod::Supervised);
    };
    match m.get("type").and_then(Value::as_str) {
        None | Some("supervised") => Ok(JobMethod::Supervised),
        Some("dpo") => Ok(JobMethod::Dpo { beta: 0.1 }),
        Some("reinforcement") => {
            let g = m.pointer("/reinforcement/grader").ok_or_else(|| {
                ApiError::invalid(
                    "a reinforcement job needs method.reinforcement.grader, e.g. {\"type\": \"string_check\", \"name\": \"exact\", \"input\": \"{{sample.output_text}}\", \"reference\": \"{{item.answer}}\", \"operation\": \"eq\"}",
                    Some("method"),
                )
            })?;
            let fields = grader(g).map_err(|e| {
                ApiError::invalid(format!("method.reinforcement.grader: {e}"), Some("method"))
            })?;
            Ok(JobMethod::Reinforcement {
                grader: g.clone(),
                fields,
                compute_multiplier: 1.0,
                eval_interval: None,
            })
        }
        Some(other) => Err(ApiError::invalid(
            format!(
                "method.type `{other}` is not a fine-tuning method: use \"supervised\", \"dpo\" or \"reinforcement\""
            ),
            Some("method"),
        )),
    }
}

/// The resolved (n_epochs, batch_size, learning_rate_multiplier), and the method with its
/// own settings resolved (DPO's beta).
fn resolve(
    req: &CreateJob,
    examples: usize,
    method: JobMethod,
) -> Result<(u32, usize, f64, JobMethod), ApiError> {
    let mut h = req.hyperparameters.clone().unwrap_or(json!({}));
    if let Some(m) = &req.method {
        let at = format!("/{}/hyperparameters", method.name());
        if let Some(Value::Object(inner)) = m.pointer(&at) {
            for (k, v) in inner {
                h[k.as_str()] = v.clone();
            }
        }
    }
    if let Value::Object(o) = &h {
        let allowed: &[&str] = match method {
            JobMethod::Supervised => &["n_epochs", "batch_size", "learning_rate_multiplier"],
            JobMethod::Dpo { .. } => {
                &["n_epochs", "batch_size", "learning_rate_multiplier", "beta"]
            }
            JobMethod::Reinforcement { .. } => &[
                "n_epochs",
                "batch_size",
                "learning_rate_multiplier",
                "compute_multiplier",
                "eval_interval",
                "eval_samples",
                "reasoning_effort",
            ],
        };
        for (k, why) in [
            (
                "eval_samples",
                "each evaluation scores one greedy reply per validation prompt",
            ),
            (
                "reasoning_effort",
                "the local models have no reasoning-effort setting",
            ),
        ] {
            if matches!(method, JobMethod::Reinforcement { .. })
                && o.get(k).is_some_and(|v| !v.is_null() && v != "auto")
            {
                return Err(ApiError::invalid(
                    format!("hyperparameters.{k}: leave it out or \"auto\" ({why})"),
                    Some("hyperparameters"),
                ));
            }
        }
        if let Some(k) = o.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::invalid(
                format!(
                    "hyperparameters.{k} is not a setting of a {} job: use {}",
                    method.name(),
                    allowed.join(", ")
                ),
                Some("hyperparameters"),
            ));
        }
    }
    let method = match method {
        JobMethod::Dpo { .. } => JobMethod::Dpo {
            beta: match setting(&h, "beta")? {
                Some(b) if b > 0.0 && b <= 2.0 => b,
                Some(b) => {
                    return Err(ApiError::invalid(
                        format!(
                            "hyperparameters.beta is {b}: give a number in (0, 2], or \"auto\""
                        ),
                        Some("hyperparameters"),
                    ))
                }
                None => 0.1,
            },
        },
        JobMethod::Reinforcement { grader, fields, .. } => JobMethod::Reinforcement {
            grader,
            fields,
            eval_interval: match setting(&h, "eval_interval")? {
                Some(v) if v >= 1.0 && v.fract() == 0.0 => Some(v as u64),
                Some(v) => {
                    return Err(ApiError::invalid(
                        format!("hyperparameters.eval_interval is {v}: give a whole number of steps ≥ 1, or \"auto\""),
                        Some("hyperparameters"),
                    ))
                }
                None => None,
            },
            compute_multiplier: match setting(&h, "compute_multiplier")? {
                Some(c) if (0.5..=8.0).contains(&c) => c,
                Some(c) => {
                    return Err(ApiError::invalid(
                        format!("hyperparameters.compute_multiplier is {c}: give a number in [0.5, 8] (samples per prompt: 4 × it), or \"auto\""),
                        Some("hyperparameters"),
                    ))
                }
                None => 1.0,
            },
        },
        m => m,
    };
    let whole = |v: f64, name: &str, max: f64| {
        if v.fract() == 0.0 && (1.0..=max).contains(&v) {
            Ok(v)
        } else {
            Err(ApiError::invalid(
                format!("hyperparameters.{name} is {v}: give a whole number from 1 to {max}, or \"auto\""),
                Some("hyperparameters"),
            ))
        }
    };
    let n_epochs = match setting(&h, "n_epochs")? {
        Some(v) => whole(v, "n_epochs", 50.0)? as u32,
        None => 3,
    };
    let batch_size = match setting(&h, "batch_size")? {
        Some(v) => whole(v, "batch_size", 256.0)? as usize,
        None => examples.clamp(1, 4),
    };
    let lr = match setting(&h, "learning_rate_multiplier")? {
        Some(v) if v > 0.0 && v <= 100.0 => v,
        Some(v) => {
            return Err(ApiError::invalid(
                format!("hyperparameters.learning_rate_multiplier is {v}: give a number in (0, 100], or \"auto\""),
                Some("hyperparameters"),
            ))
        }
        None => 1.0,
    };
    Ok((n_epochs, batch_size, lr, method))
}

/// The job as OpenAI's `fine_tuning.job`.
fn job_object(j: &JobRecord) -> Value {
    let (n_epochs, batch_size, lr) = hyper(&j.spec);
    let hp =
        json!({"n_epochs": n_epochs, "batch_size": batch_size, "learning_rate_multiplier": lr});
    let method = JobMethod::of(&j.spec);
    let mut method_hp = hp.clone();
    let mut settings = json!({});
    match &method {
        JobMethod::Dpo { beta } => method_hp["beta"] = json!(beta),
        JobMethod::Reinforcement {
            grader,
            compute_multiplier,
            eval_interval,
            ..
        } => {
            method_hp["compute_multiplier"] = json!(compute_multiplier);
            method_hp["eval_interval"] = eval_interval.map_or(json!("auto"), |v| json!(v));
            method_hp["eval_samples"] = json!(1);
            settings["grader"] = grader.clone();
        }
        JobMethod::Supervised => {}
    }
    settings["hyperparameters"] = method_hp;
    json!({
        "id": j.id,
        "object": "fine_tuning.job",
        "model": j.model,
        "created_at": j.created_at,
        "finished_at": j.finished_at,
        "fine_tuned_model": j.fine_tuned_model,
        "organization_id": "org-ferrolm",
        "result_files": [],
        "status": j.status,
        "training_file": j.training_file,
        "validation_file": j.validation_file,
        "hyperparameters": hp,
        "trained_tokens": j.trained_tokens,
        "error": j.error,
        "seed": j.spec["seed"],
        "estimated_finish": null,
        "integrations": [],
        "metadata": j.spec["metadata"],
        "user_provided_suffix": j.spec["suffix"],
        "method": {"type": method.name(), method.name(): settings},
    })
}

/// A file of the caller's for fine-tuning, checked; its number of examples.
fn training_input(
    s: &AppState,
    t: &Tuner,
    caller: &Caller,
    id: &str,
    format: &FileFormat,
    param: &'static str,
) -> Result<usize, ApiError> {
    let f = s
        .access
        .store
        .file(id, caller.key_id())
        .map_err(ApiError::storage)?
        .ok_or_else(|| no_file(id, Some(param)))?;
    if f.purpose != "fine-tune" {
        return Err(ApiError::invalid(
            format!(
                "`{id}` was uploaded with purpose `{}`: upload it with purpose=fine-tune",
                f.purpose
            ),
            Some(param),
        ));
    }
    // A local copy (fetched from the blob store on first use): training reads it later.
    let bytes = t
        .blobs
        .fetch_file(&crate::tuner::file_key(id))
        .and_then(|path| {
            std::fs::read(&path).map_err(|e| BlobError::Io {
                blobs: t.blobs.shown().to_owned(),
                op: "read the local copy of",
                key: path.display().to_string(),
                message: e.to_string(),
                hint: "; check the data dir's disk",
                not_found: false,
            })
        })
        .map_err(|e| {
            ApiError::server(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the file `{id}` is recorded but cannot be read: {e}"),
            )
        })?;
    validate(t, &bytes, format, param)
}

/// `POST /v1/fine_tuning/jobs`.
pub async fn create(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    tuner(&s)?;
    let req: CreateJob = parse(&body)?;
    if req.integrations.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(ApiError::invalid(
            "integrations are not supported here: leave them out",
            Some("integrations"),
        ));
    }
    // A base model every caller may use (not a fine-tuned one).
    let base = s.model(None, Some(&req.model)).map_err(|e| {
        if req.model.starts_with("ft:") {
            ApiError::invalid(
                format!("`{}` is a fine-tuned model: fine-tune a base model (GET /v1/models lists them)", req.model),
                Some("model"),
            )
        } else {
            e
        }
    })?;
    if let Some(sfx) = &req.suffix {
        if sfx.len() > 64
            || !sfx
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ApiError::invalid(
                format!("suffix `{sfx}`: use up to 64 letters, digits, `-` and `_`"),
                Some("suffix"),
            ));
        }
    }
    if req
        .metadata
        .as_ref()
        .is_some_and(|m| !(m.is_object() || m.is_null()))
    {
        return Err(ApiError::invalid(
            "metadata must be an object of string values",
            Some("metadata"),
        ));
    }
    let state = s.clone();
    let job = tokio::task::spawn_blocking(move || -> Result<JobRecord, ApiError> {
        let s = state;
        let t = tuner(&s)?;
        let store = &s.access.store;
        let method = method_of(&req, &t.hooks.grader)?;
        let format = method.format();
        let examples = training_input(&s, t, &caller, &req.training_file, &format, "training_file")?;
        if let Some(v) = &req.validation_file {
            training_input(&s, t, &caller, v, &format, "validation_file")?;
        }
        let (n_epochs, batch_size, lr, method) = resolve(&req, examples, method)?;
        let beta = match &method {
            JobMethod::Dpo { beta } => json!(beta),
            _ => Value::Null,
        };
        let (grader, fields, compute, eval_interval) = match &method {
            JobMethod::Reinforcement {
                grader,
                fields,
                compute_multiplier,
                eval_interval,
            } => (grader.clone(), json!(fields), json!(compute_multiplier), json!(eval_interval)),
            _ => (Value::Null, Value::Null, Value::Null, Value::Null),
        };
        let seed = req.seed.unwrap_or_else(|| crate::random_seed() >> 33);
        let mut job = JobRecord {
            id: new_id("ftjob"),
            key_id: caller.key_id(),
            created_at: unix_s(),
            status: "validating_files".into(),
            model: base.id.clone(),
            training_file: req.training_file.clone(),
            validation_file: req.validation_file.clone(),
            spec: json!({
                "hyperparameters": {"n_epochs": n_epochs, "batch_size": batch_size, "learning_rate_multiplier": lr},
                "suffix": req.suffix,
                "seed": seed,
                "metadata": req.metadata,
                "examples": examples,
                "method": method.name(),
                "beta": beta,
                "grader": grader,
                "grader_fields": fields,
                "compute_multiplier": compute,
                "eval_interval": eval_interval,
            }),
            fine_tuned_model: None,
            finished_at: None,
            trained_tokens: None,
            error: None,
            epoch: 0,
        };
        store.insert_job(&job).map_err(ApiError::storage)?;
        log_event(store, &job.id, "info", format!("Validating training file: {}", job.training_file), None);
        // The files were validated above (and at upload); the worker takes it from here.
        store
            .set_job_status(&job.id, "queued", &["validating_files"])
            .map_err(ApiError::storage)?;
        log_event(store, &job.id, "info", format!("Files validated ({examples} examples), moving job to queued state"), None);
        job.status = "queued".into();
        t.wake();
        Ok(job)
    })
    .await
    .map_err(|e| ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(job_object(&job)))
}

#[derive(Debug, Deserialize)]
pub struct PageParams {
    after: Option<String>,
    limit: Option<usize>,
}

fn limit(q: &PageParams, default: usize) -> Result<usize, ApiError> {
    match q.limit {
        None => Ok(default),
        Some(n) if (1..=100).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(
            format!("limit is {n}: give 1 to 100"),
            Some("limit"),
        )),
    }
}

fn list_object(data: Vec<Value>, has_more: bool) -> Value {
    json!({
        "object": "list",
        "first_id": data.first().map(|d| d["id"].clone()),
        "last_id": data.last().map(|d| d["id"].clone()),
        "data": data,
        "has_more": has_more,
    })
}

/// `GET /v1/fine_tuning/jobs`: the caller's jobs, newest first.
pub async fn list(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<PageParams>,
) -> Result<Json<Value>, ApiError> {
    tuner(&s)?;
    let page = s
        .access
        .store
        .jobs(caller.key_id(), q.after.as_deref(), limit(&q, 20)?)
        .map_err(|e| match e {
            ferrolm_accounting::AccountingError::InvalidQuery(m) => {
                ApiError::invalid(m, Some("after"))
            }
            e => ApiError::storage(e),
        })?;
    let data = page.items.iter().map(job_object).collect();
    Ok(Json(list_object(data, page.has_more)))
}

fn no_job(id: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: Some("fine_tuning_job_not_found"),
        ..ApiError::invalid(
            format!("no fine-tuning job `{id}`: GET /v1/fine_tuning/jobs lists yours"),
            None,
        )
    }
}

fn own_job(s: &AppState, caller: &Caller, id: &str) -> Result<JobRecord, ApiError> {
    s.access
        .store
        .job(id, caller.key_id())
        .map_err(ApiError::storage)?
        .ok_or_else(|| no_job(id))
}

/// `GET /v1/fine_tuning/jobs/{id}`.
pub async fn get_one(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    tuner(&s)?;
    Ok(Json(job_object(&own_job(&s, &caller, &id)?)))
}

/// `after` of the events and checkpoints lists: an id this module made (`<prefix>-<seq>`).
fn after_seq(q: &PageParams, prefix: &str) -> Result<Option<i64>, ApiError> {
    q.after
        .as_deref()
        .map(|a| {
            a.strip_prefix(prefix)
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("after: `{a}` is not an id from this list"),
                        Some("after"),
                    )
                })
        })
        .transpose()
}

fn event_object(e: &JobEvent) -> Value {
    json!({
        "object": "fine_tuning.job.event",
        "id": format!("ftevent-{}", e.seq),
        "created_at": e.created_at,
        "level": e.level,
        "message": e.message,
        "type": e.kind,
        "data": e.data.clone().unwrap_or(json!({})),
    })
}

/// `GET /v1/fine_tuning/jobs/{id}/events`: newest first.
pub async fn events(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<PageParams>,
) -> Result<Json<Value>, ApiError> {
    tuner(&s)?;
    let job = own_job(&s, &caller, &id)?;
    let page = s
        .access
        .store
        .job_events(&job.id, after_seq(&q, "ftevent-")?, limit(&q, 20)?)
        .map_err(ApiError::storage)?;
    let data = page.items.iter().map(event_object).collect();
    Ok(Json(list_object(data, page.has_more)))
}

fn checkpoint_object(job: &str, c: &JobCheckpoint) -> Value {
    json!({
        "object": "fine_tuning.job.checkpoint",
        "id": format!("ftckpt-{}", c.seq),
        "created_at": c.created_at,
        "fine_tuned_model_checkpoint": c.model,
        "fine_tuning_job_id": job,
        "metrics": c.metrics,
        "step_number": c.step,
    })
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`: newest first.
pub async fn checkpoints(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<PageParams>,
) -> Result<Json<Value>, ApiError> {
    tuner(&s)?;
    let job = own_job(&s, &caller, &id)?;
    let page = s
        .access
        .store
        .job_checkpoints(&job.id, after_seq(&q, "ftckpt-")?, limit(&q, 10)?)
        .map_err(ApiError::storage)?;
    let data = page
        .items
        .iter()
        .map(|c| checkpoint_object(&job.id, c))
        .collect();
    Ok(Json(list_object(data, page.has_more)))
}

/// Move the caller's job `id` from one of `from` to `to`, or say why it cannot.
fn transition(
    s: &AppState,
    caller: &Caller,
    id: &str,
    to: &str,
    from: &[&str],
    verb: &str,
) -> Result<JobRecord, ApiError> {
    let job = own_job(s, caller, id)?;
    let store = &s.access.store;
    let moved = if to == "cancelled" {
        store.finish_job(id, to, from, None, None, None, unix_s())
    } else {
        store.set_job_status(id, to, from)
    }
    .map_err(ApiError::storage)?;
    if !moved {
        return Err(ApiError::invalid(
            format!(
                "the job is {}: only a job that is {} can be {verb}",
                job.status,
                from.join(" or ")
            ),
            None,
        ));
    }
    own_job(s, caller, id)
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`.
pub async fn cancel(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let t = tuner(&s)?;
    let job = transition(
        &s,
        &caller,
        &id,
        "cancelled",
        &["validating_files", "queued", "running", "paused"],
        "cancelled",
    )?;
    let stopping = t.stop(&id);
    log_event(
        &s.access.store,
        &id,
        "info",
        if stopping {
            "Fine-tuning job cancelled: training stops after this step"
        } else {
            "Fine-tuning job cancelled"
        }
        .into(),
        None,
    );
    Ok(Json(job_object(&job)))
}

/// `POST /v1/fine_tuning/jobs/{id}/pause`: stop with a checkpoint; `resume` goes on from it.
pub async fn pause(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let t = tuner(&s)?;
    let job = transition(&s, &caller, &id, "paused", &["queued", "running"], "paused")?;
    t.stop(&id);
    log_event(
        &s.access.store,
        &id,
        "info",
        "Fine-tuning job paused: its checkpoints are kept".into(),
        None,
    );
    Ok(Json(job_object(&job)))
}

/// `POST /v1/fine_tuning/jobs/{id}/resume`: queue a paused job again.
pub async fn resume(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let t = tuner(&s)?;
    let job = transition(&s, &caller, &id, "queued", &["paused"], "resumed")?;
    log_event(
        &s.access.store,
        &id,
        "info",
        "Fine-tuning job resumed: queued again".into(),
        None,
    );
    t.wake();
    Ok(Json(job_object(&job)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: Value) -> CreateJob {
        serde_json::from_value(body).unwrap_or_else(|e| panic!("{e}"))
    }

    /// (n_epochs, batch_size, multiplier) as a job would get them.
    /// The server's side of the grader hook: the binary's parses OpenAI's graders (tested in
    /// `ferrolm_train::grader`); this one refuses `python` the same way.
    fn grader(v: &Value) -> Result<Vec<String>, String> {
        match v["type"].as_str() {
            Some("python") => Err("no python here".into()),
            _ => Ok(Vec::new()),
        }
    }

    fn res(r: &CreateJob, examples: usize) -> Result<(u32, usize, f64), ApiError> {
        let (e, b, lr, _) = resolve(r, examples, method_of(r, &grader)?)?;
        Ok((e, b, lr))
    }

    #[test]
    fn auto_settings_resolve_to_the_documented_defaults() {
        let r = req(json!({"model": "m", "training_file": "f"}));
        assert_eq!(res(&r, 12).ok(), Some((3, 4, 1.0)));
        assert_eq!(res(&r, 2).ok(), Some((3, 2, 1.0)));
        let r = req(
            json!({"model": "m", "training_file": "f", "hyperparameters": {"n_epochs": "auto", "batch_size": 8, "learning_rate_multiplier": 0.5}}),
        );
        assert_eq!(res(&r, 12).ok(), Some((3, 8, 0.5)));
    }

    #[test]
    fn the_method_shape_wins_over_the_top_level_field_by_field() {
        let r = req(json!({
            "model": "m", "training_file": "f",
            "hyperparameters": {"n_epochs": 2, "batch_size": 2},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
        }));
        assert_eq!(res(&r, 12).ok(), Some((1, 2, 1.0)));
    }

    #[test]
    fn bad_settings_name_the_field() {
        for (h, needle) in [
            (json!({"n_epochs": 0}), "n_epochs"),
            (json!({"n_epochs": 1.5}), "n_epochs"),
            (json!({"batch_size": "big"}), "batch_size"),
            (
                json!({"learning_rate_multiplier": -1}),
                "learning_rate_multiplier",
            ),
            (json!({"warmup": 3}), "warmup"),
        ] {
            let r = req(json!({"model": "m", "training_file": "f", "hyperparameters": h}));
            let e = res(&r, 12).err().map(|e| e.message).unwrap_or_default();
            assert!(e.contains(needle), "{h}: {e}");
        }
        let r =
            req(json!({"model": "m", "training_file": "f", "method": {"type": "reinforcement"}}));
        let e = res(&r, 12).err().map(|e| e.message).unwrap_or_default();
        assert!(e.contains("needs method.reinforcement.grader"), "{e}");
        let r = req(
            json!({"model": "m", "training_file": "f", "method": {"type": "reinforcement",
            "reinforcement": {"grader": {"type": "python"}}}}),
        );
        let e = res(&r, 12).err().map(|e| e.message).unwrap_or_default();
        assert!(
            e.starts_with("method.reinforcement.grader: no python"),
            "{e}"
        );
        let r = req(
            json!({"model": "m", "training_file": "f", "method": {"type": "reinforcement",
            "reinforcement": {"grader": {"type": "string_check"},
                              "hyperparameters": {"compute_multiplier": 20}}}}),
        );
        let e = res(&r, 12).err().map(|e| e.message).unwrap_or_default();
        assert!(e.contains("compute_multiplier is 20"), "{e}");
        let r = req(
            json!({"model": "m", "training_file": "f", "method": {"type": "reinforcement",
            "reinforcement": {"grader": {"type": "string_check"},
                              "hyperparameters": {"reasoning_effort": "high", "eval_samples": "auto"}}}}),
        );
        let e = res(&r, 12).err().map(|e| e.message).unwrap_or_default();
        assert!(e.contains("reasoning_effort"), "{e}");
        let r = req(json!({"model": "m", "training_file": "f", "method": {"type": "ppo"}}));
        assert!(res(&r, 12).is_err());
        // beta belongs to DPO jobs only
        let r = req(json!({"model": "m", "training_file": "f", "hyperparameters": {"beta": 0.2}}));
        let e = res(&r, 12).err().map(|e| e.message).unwrap_or_default();
        assert!(e.contains("not a setting of a supervised job"), "{e}");
    }

    #[test]
    fn dpo_jobs_take_their_hyperparameters_and_beta() {
        let r = req(json!({
            "model": "m", "training_file": "f",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}},
        }));
        let (e, b, lr, m) = resolve(
            &r,
            12,
            method_of(&r, &grader).unwrap_or(JobMethod::Supervised),
        )
        .unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!((e, b, lr, m), (2, 4, 1.0, JobMethod::Dpo { beta: 0.25 }));
        let r = req(json!({"model": "m", "training_file": "f", "method": {"type": "dpo"}}));
        assert_eq!(
            resolve(&r, 12, JobMethod::Dpo { beta: 0.1 })
                .ok()
                .map(|x| x.3),
            Some(JobMethod::Dpo { beta: 0.1 })
        );
        let r = req(json!({
            "model": "m", "training_file": "f",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 5}}},
        }));
        let e = resolve(&r, 12, JobMethod::Dpo { beta: 0.1 })
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(e.contains("beta"), "{e}");
    }
}
