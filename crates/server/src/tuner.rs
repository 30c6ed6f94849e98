//! The fine-tuning worker: one thread per server that takes jobs from the store's queue one at
//! a time, oldest first, and keeps the store up to date as they go.
//!
//! Contract:
//! - The server never trains (it never touches tensors): the binary hands it [`Hooks`], which
//!   validate a training file, run a job's training into its run directory, and load a finished
//!   run as a [`ServedModel`]. A LoRA run whose base model is served is served as an adapter on
//!   that base instead (see `adapters`): one engine and one copy of the weights for all.
//! - Everything a job is lives in the store (`ferrolm_accounting`'s files and jobs) and in
//!   the blob store's `fine_tuning/<job id>/` (the run: checkpoints, metrics, the adapter;
//!   trained in a local directory, mirrored into the blob store at each checkpoint and before
//!   the job succeeds, see `blobs`); this module only keeps the running job's stop flag in
//!   memory. So a restart (even after `kill -9`) loses nothing: [`AppState::start_fine_tuning`]
//!   serves the succeeded jobs' models again, and a run directory (local, or in the blob store)
//!   that holds a run is resumed from its latest checkpoint.
//! - The queue is the store's (see `ferrolm_accounting`'s `tuning`): the worker claims a job
//!   under a lease ([`Store::claim_job`]), renews it every third of the lease on a thread of
//!   its own while the job trains ([`LeaseKeeper`]), and looks for work when a job is queued on
//!   this server and every [`poll_every`] otherwise: jobs queued through other replicas, and
//!   jobs whose worker died (its lease ran out). So with replicas sharing a PostgreSQL store
//!   and a blob store, exactly one worker runs each job, and a killed replica's job continues
//!   on another from its last checkpoint. Each claim is a new epoch of the job (a fencing
//!   token): the run is mirrored into that claim's own blob folder ([`run_blob_key`]) and its
//!   checkpoints are recorded only while the claim is current, so a worker that stalled past
//!   its lease clobbers nothing and stops at its next checkpoint; a resume fetches the folder
//!   of the newest recorded checkpoint. `serve --no-worker` starts no worker: the replica
//!   answers the endpoints and serves the models, and never trains.
//! - On a store only this server uses (SQLite), a start takes back the jobs the last run left
//!   `running` at once, without waiting for their leases to run out.
//! - Cancel and pause are written to the store by the handler first, then the running job's
//!   stop flag is raised: on this replica at once, on another at its next lease renewal (which
//!   fails, the job being no longer `running`). Training stops at the end of its step and
//!   writes a checkpoint. The worker only ends jobs that are still `running` under its lease,
//!   so it never overwrites a cancel, a pause, or another worker's takeover. A server that
//!   stops mid-job gives up its lease, so another worker continues the job at once.
//! - A job's log gets a metrics event every [`STEP_EVENT_EVERY`] steps, at the last step, and
//!   at every evaluation (with the validation loss and token accuracy); every checkpoint is a
//!   checkpoint row.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use ferrolm_accounting::{Claim, JobCheckpoint, JobEvent, JobRecord, Store};
use serde_json::{json, Value};

use crate::blobs::Blobs;
use crate::{AppState, ServedModel};

/// Steps between two metrics events (every evaluation makes one too).
pub const STEP_EVENT_EVERY: u64 = 10;
/// A worker's lease on a job, unless `serve --job-lease` says otherwise: long enough that a
/// busy store or a slow renewal does not lose it, short enough that a dead replica's job
/// continues within a minute.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The longest a worker waits before looking for jobs queued elsewhere or left by a dead one.
const MAX_POLL: Duration = Duration::from_secs(5);

/// How often a worker with `lease` looks for work it was not told of (a third of the lease,
/// at most [`MAX_POLL`]).
pub fn poll_every(lease: Duration) -> Duration {
    (lease / 3).min(MAX_POLL)
}

/// One job's training, as the hooks run it.
#[derive(Debug, Clone)]
pub struct TrainSpec {
    /// The served base model's id.
    pub base_model: String,
    pub training_file: PathBuf,
    pub validation_file: Option<PathBuf>,
    pub n_epochs: u32,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
    pub seed: u64,
    /// The objective.
    pub method: JobMethod,
    /// The run directory.
    pub out: PathBuf,
    /// Continue the run in `out` (it was started before).
    pub resume: bool,
}

/// A job's objective: OpenAI's `method.type`, with its own settings.
#[derive(Debug, Clone, PartialEq)]
pub enum JobMethod {
    Supervised,
    Dpo {
        beta: f64,
    },
    /// Reinforcement fine-tuning: the grader (OpenAI's JSON, checked by [`Hooks::grader`]),
    /// its item fields, and `compute_multiplier` (samples per prompt = 4 × it, at least 2).
    Reinforcement {
        grader: Value,
        fields: Vec<String>,
        compute_multiplier: f64,
        /// Steps between evaluations (`None`: about 1/5 of the run).
        eval_interval: Option<u64>,
    },
}

impl JobMethod {
    /// From a job's stored spec (`"method": "dpo", "beta": …`; absent: supervised).
    pub fn of(spec: &Value) -> Self {
        match spec["method"].as_str() {
            Some("dpo") => JobMethod::Dpo {
                beta: spec["beta"].as_f64().unwrap_or(0.1),
            },
            Some("reinforcement") => JobMethod::Reinforcement {
                grader: spec["grader"].clone(),
                fields: spec["grader_fields"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|f| f.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                compute_multiplier: spec["compute_multiplier"].as_f64().unwrap_or(1.0),
                eval_interval: spec["eval_interval"].as_u64(),
            },
            _ => JobMethod::Supervised,
        }
    }

    /// OpenAI's name for it.
    pub fn name(&self) -> &'static str {
        match self {
            JobMethod::Supervised => "supervised",
            JobMethod::Dpo { .. } => "dpo",
            JobMethod::Reinforcement { .. } => "reinforcement",
        }
    }

    /// The format its training files are in.
    pub fn format(&self) -> FileFormat {
        match self {
            JobMethod::Supervised => FileFormat::Chat,
            JobMethod::Dpo { .. } => FileFormat::Preference,
            JobMethod::Reinforcement { fields, .. } => FileFormat::Reinforcement(fields.clone()),
        }
    }
}

/// The JSONL formats of fine-tuning files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileFormat {
    /// `{"messages": [...]}` per line (supervised).
    Chat,
    /// `{"input": …, "preferred_output": …, "non_preferred_output": …}` per line (DPO).
    Preference,
    /// `{"messages": [...up to the turn to answer], …}` per line, with these fields (what the
    /// grader reads as `{{item.field}}`) on every line (reinforcement).
    Reinforcement(Vec<String>),
    /// Any (an upload, before a job says which).
    Either,
}

/// A preference run's figures at a step or an evaluation (means over its pairs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreferenceFigures {
    pub rewards_chosen: f32,
    pub rewards_rejected: f32,
    pub reward_margin: f32,
    pub pair_accuracy: f32,
    pub logps_chosen: f32,
}

impl PreferenceFigures {
    /// Into an event's metrics, keys prefixed (`train_`, `valid_`).
    fn put(&self, prefix: &str, m: &mut Value) {
        for (k, v) in [
            ("rewards_chosen", self.rewards_chosen),
            ("rewards_rejected", self.rewards_rejected),
            ("reward_margin", self.reward_margin),
            ("pair_accuracy", self.pair_accuracy),
            ("logps_chosen", self.logps_chosen),
        ] {
            m[format!("{prefix}{k}")] = num(v);
        }
    }
}

/// What a training run reports while it runs (steps count from 1: `step` steps are done).
#[derive(Debug, Clone)]
pub enum Progress {
    Started {
        from_step: u64,
        total_steps: u64,
        /// Trained tokens in one pass over the training file.
        tokens_per_epoch: u64,
    },
    Step {
        step: u64,
        train_loss: f32,
        preference: Option<PreferenceFigures>,
        /// Further figures for the event (reinforcement: `reward_mean`, `kl`, …).
        extra: serde_json::Map<String, Value>,
    },
    Eval {
        step: u64,
        train_loss: f32,
        valid_loss: f32,
        token_accuracy: Option<f32>,
        preference: Option<PreferenceFigures>,
        extra: serde_json::Map<String, Value>,
    },
    Checkpoint {
        step: u64,
    },
    /// Something the job's owner should see (a `warn` event).
    Warning {
        message: String,
    },
}

/// How a training run ended.
#[derive(Debug, Clone, Copy)]
pub struct TrainEnd {
    /// The stop flag ended it (a checkpoint was written).
    pub interrupted: bool,
    pub steps: u64,
}

/// A training file's check in a format: its number of examples, or its bad lines
/// (`line N: reason`).
pub type Validate = dyn Fn(&str, &FileFormat) -> Result<usize, Vec<String>> + Send + Sync;
/// Check a reinforcement job's grader (OpenAI's JSON): the item fields it reads, or what is
/// wrong with it.
pub type GraderCheck = dyn Fn(&Value) -> Result<Vec<String>, String> + Send + Sync;
/// Run one job's training; `Err` is the message the job fails with.
/// (`Send` callback: the hooks may run training on a thread pool of their own.)
pub type Train = dyn Fn(&TrainSpec, &AtomicBool, &mut (dyn FnMut(Progress) + Send)) -> Result<TrainEnd, String>
    + Send
    + Sync;
/// Load a finished run directory as a served model called `id` (a model of its own, with the
/// adapter folded in: for runs whose base model is not served).
pub type Load = dyn Fn(&Path, &str) -> Result<ServedModel, String> + Send + Sync;

/// What the binary provides for fine-tuning.
pub struct Hooks {
    pub validate: Box<Validate>,
    pub grader: Box<GraderCheck>,
    pub train: Box<Train>,
    pub load: Box<Load>,
}

/// What the worker thread and the handlers share.
#[derive(Default)]
struct Queue {
    /// A job was queued through this server: look now rather than at the next poll.
    woken: bool,
    /// The running job and its stop flag.
    running: Option<(String, Arc<AtomicBool>)>,
    shutdown: bool,
}

/// The worker's identity in the store and its lease.
#[derive(Clone, Debug)]
struct Worker {
    /// `host:pid:random`, unique among the replicas (and readable in a job's log).
    owner: String,
    lease: Duration,
}

impl Worker {
    fn new(lease: Duration) -> Worker {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let tag = crate::random_seed() & 0xff_ffff;
        Worker {
            owner: format!("{host}:{}:{tag:06x}", std::process::id()),
            lease,
        }
    }
}

/// The handlers' view of the queue, the worker and where files and runs live.
pub struct Tuner {
    pub hooks: Arc<Hooks>,
    /// The data dir (`preferences/` is in it).
    dir: PathBuf,
    /// Uploaded files (`files/<id>`) and runs (`fine_tuning/<job id>/`); training works on
    /// their local paths.
    pub blobs: Blobs,
    queue: Arc<(Mutex<Queue>, Condvar)>,
    /// The worker thread; `None` with `--no-worker`.
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The blob key of an uploaded file.
pub fn file_key(id: &str) -> String {
    format!("files/{id}")
}

/// The key (a folder) of a job's run: its local directory ([`Blobs::local`]).
pub fn run_key(id: &str) -> String {
    format!("fine_tuning/{id}")
}

/// The blob folder of the run a job's claim `epoch` wrote (its fencing token, see
/// `ferrolm_accounting`'s `tuning`): each claim mirrors its run into its own folder, so a
/// worker that stalled past its lease overwrites nothing of the new owner's. Epoch 0 (runs
/// written before claims had epochs) is the job's folder itself.
pub fn run_blob_key(id: &str, epoch: i64) -> String {
    if epoch == 0 {
        run_key(id)
    } else {
        format!("fine_tuning/{id}/epoch-{epoch}")
    }
}

impl Tuner {
    /// A preference file (`POST /v1/preferences`): `DATA_DIR/preferences/<name>`.
    pub fn preference_path(&self, name: &str) -> PathBuf {
        self.dir.join("preferences").join(name)
    }

    /// A job's run directory, on this machine (see [`Blobs::local`]).
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.blobs.local(&run_key(id))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A job was queued in the store: this server's worker (if it has one) looks at once.
    pub fn wake(&self) {
        self.lock().woken = true;
        self.queue.1.notify_all();
    }

    /// Ask the running job `id` to stop (it writes a checkpoint); whether it was running.
    pub fn stop(&self, id: &str) -> bool {
        let q = self.lock();
        match &q.running {
            Some((r, flag)) if r == id => {
                flag.store(true, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Stop the worker: the running job writes a checkpoint and stays `running` in the store,
    /// its lease given up (another worker, or the next start, resumes it). Waits for the
    /// worker to end.
    pub fn shutdown(&self) {
        {
            let mut q = self.lock();
            q.shutdown = true;
            if let Some((_, flag)) = &q.running {
                flag.store(true, Ordering::Relaxed);
            }
            self.queue.1.notify_all();
        }
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = worker {
            if w.join().is_err() {
                eprintln!("ferrolm serve: the fine-tuning worker panicked");
            }
        }
    }
}

pub fn unix_s() -> i64 {
    crate::auth::unix_ms() / 1000
}

/// Append a message (`data: None`) or metrics event to a job's log; storage errors are logged.
pub fn log_event(store: &Store, job: &str, level: &str, message: String, data: Option<Value>) {
    let e = JobEvent {
        seq: 0,
        created_at: unix_s(),
        level: level.into(),
        kind: if data.is_some() { "metrics" } else { "message" }.into(),
        message,
        data,
    };
    if let Err(err) = store.add_job_event(job, &e) {
        eprintln!("ferrolm serve: {job}: could not write an event: {err}");
    }
}

/// The job's settings as the store keeps them (`spec.hyperparameters`).
pub fn hyper(spec: &Value) -> (u32, usize, f64) {
    let h = &spec["hyperparameters"];
    (
        h["n_epochs"].as_u64().unwrap_or(3) as u32,
        h["batch_size"].as_u64().unwrap_or(1) as usize,
        h["learning_rate_multiplier"].as_f64().unwrap_or(1.0),
    )
}

/// The model name a job's success serves: `ft:<base>:<suffix>:<job id>` (OpenAI's shape,
/// with an empty suffix when none was given).
pub fn fine_tuned_name(job: &JobRecord) -> String {
    let suffix = job.spec["suffix"].as_str().unwrap_or_default();
    format!("ft:{}:{suffix}:{}", job.model, job.id)
}

/// A finished run, read and ready to serve.
enum Servable {
    /// Its adapter, on the served base model of this id.
    Adapter(String, ferrolm_engine::Adapter),
    Model(Box<ServedModel>),
}

impl AppState {
    /// Read the finished run `run` of a job on the base model `base`: its PEFT adapter when the
    /// base is served here, else the whole model (the base with the adapter folded in).
    fn read_run(
        &self,
        hooks: &Hooks,
        run: &Path,
        base: &str,
        name: &str,
    ) -> Result<Servable, String> {
        let peft = run.join("adapter");
        let base_served = self
            .all_models()
            .iter()
            .any(|m| m.owner.is_none() && m.adapter.is_none() && m.id == base);
        if base_served
            && self.adapters.get().is_some()
            && peft.join("adapter_config.json").is_file()
        {
            let ad = self.read_adapter(&peft, base, name)?;
            return Ok(Servable::Adapter(base.to_owned(), ad));
        }
        (hooks.load)(run, name).map(|m| Servable::Model(Box::new(m)))
    }

    fn serve_run(&self, run: Servable, name: &str, owner: Option<i64>) -> Result<(), String> {
        match run {
            Servable::Adapter(base, ad) => self
                .add_adapter(&base, name.to_owned(), Vec::new(), ad, owner)
                .map(|_| ())
                .map_err(|e| e.message),
            Servable::Model(m) => {
                self.add_model(*m, owner);
                Ok(())
            }
        }
    }

    /// Enable `/v1/files` and `/v1/fine_tuning`: files and runs in `blobs`, other local state
    /// under `data_dir`. On a store of its own (SQLite), serves the succeeded jobs' models
    /// again (fetching their runs from the blob store) and queues the jobs a previous run left
    /// running; on a shared one, other replicas' models are loaded on first use
    /// ([`AppState::load_tuned`]) and their jobs are theirs until a lease runs out. Starts a
    /// worker that claims jobs under leases of `worker_lease` (`None`: no worker, this
    /// server never trains). Call [`AppState::stop_fine_tuning`] before dropping the state.
    pub fn start_fine_tuning(
        &self,
        hooks: Hooks,
        data_dir: &Path,
        blobs: Blobs,
        worker_lease: Option<Duration>,
    ) -> Result<(), String> {
        for sub in ["files", "fine_tuning"] {
            let d = blobs.local(sub);
            std::fs::create_dir_all(&d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        let tuner = Tuner {
            hooks: Arc::new(hooks),
            dir: data_dir.to_owned(),
            blobs,
            queue: Arc::default(),
            worker: Mutex::new(None),
        };
        let store = &self.access.store;
        let succeeded = if store.is_shared() {
            Vec::new()
        } else {
            store
                .jobs_with_status(&["succeeded"])
                .map_err(|e| e.to_string())?
        };
        for job in succeeded {
            let name = job.fine_tuned_model.clone().unwrap_or_default();
            let served = tuner
                .blobs
                .fetch_dir(&run_blob_key(&job.id, job.epoch), &run_key(&job.id))
                .map_err(|e| e.to_string())
                .and_then(|run| self.read_run(&tuner.hooks, &run, &job.model, &name))
                .and_then(|r| self.serve_run(r, &name, job.key_id));
            match served {
                Ok(()) => {}
                Err(e) => eprintln!(
                    "ferrolm serve: {}: cannot serve `{name}` again: {e}",
                    job.id
                ),
            }
        }
        let unfinished = if store.is_shared() {
            Vec::new()
        } else {
            store
                .jobs_with_status(&["validating_files", "queued", "running"])
                .map_err(|e| e.to_string())?
        };
        for job in unfinished.iter().filter(|j| j.status != "queued") {
            let _ = store.set_job_status(&job.id, "queued", &[job.status.as_str()]);
            log_event(
                store,
                &job.id,
                "info",
                format!(
                    "The server restarted while the job was {}: it is queued again",
                    job.status
                ),
                None,
            );
        }
        // The tuner is in place before the worker starts: `run_job` finds it.
        let queue = tuner.queue.clone();
        self.tuning
            .set(tuner)
            .map_err(|_| "fine-tuning was already started".to_owned())?;
        let Some(lease) = worker_lease else {
            eprintln!("ferrolm serve: no fine-tuning worker (--no-worker): jobs queued here run on other replicas");
            return Ok(());
        };
        let me = Worker::new(lease);
        eprintln!(
            "ferrolm serve: fine-tuning worker {} (lease {:.1} s)",
            me.owner,
            lease.as_secs_f64()
        );
        let state = self.clone();
        let worker = std::thread::Builder::new()
            .name("ferrolm-finetune".into())
            .spawn(move || work(&state, &queue, &me))
            .map_err(|e| format!("cannot start the fine-tuning thread: {e}"))?;
        if let Some(t) = self.tuning.get() {
            *t.worker.lock().unwrap_or_else(PoisonError::into_inner) = Some(worker);
        }
        Ok(())
    }

    /// Serve the fine-tuned model `name` (`ft:…:<job id>`) of `key` that another replica
    /// sharing the store trained: its job succeeded, so its run is in the blob store. Fetch
    /// the run into the local cache, load and serve it. Whether it was loaded now; failures
    /// are logged (the request then finds no such model).
    pub(crate) fn load_tuned(&self, key: Option<i64>, name: &str) -> bool {
        let Some(t) = self.tuning.get() else {
            return false;
        };
        let Some(id) = name
            .rsplit(':')
            .next()
            .filter(|id| id.starts_with("ftjob-"))
        else {
            return false;
        };
        let job = match self.access.store.job(id, key) {
            Ok(Some(j))
                if j.status == "succeeded" && j.fine_tuned_model.as_deref() == Some(name) =>
            {
                j
            }
            _ => return false,
        };
        // A blocking fetch and load, off the async executor (the caller may be on it).
        let load = || {
            t.blobs
                .fetch_dir(&run_blob_key(id, job.epoch), &run_key(id))
                .map_err(|e| e.to_string())
                .and_then(|run| self.read_run(&t.hooks, &run, &job.model, name))
                .and_then(|r| self.serve_run(r, name, job.key_id))
        };
        let loaded = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(load),
            // A current-thread runtime cannot be blocked on (the server's is multi-threaded).
            Ok(_) => return false,
            Err(_) => load(),
        };
        match loaded {
            Ok(()) => {
                eprintln!("ferrolm serve: {id}: `{name}` loaded from the blob store on first use");
                true
            }
            Err(e) => {
                eprintln!("ferrolm serve: {id}: cannot serve `{name}` from the blob store: {e}");
                false
            }
        }
    }

    /// Stop the worker (see [`Tuner::shutdown`]); it holds the state until then.
    pub fn stop_fine_tuning(&self) {
        if let Some(t) = self.tuning.get() {
            t.shutdown();
        }
    }
}

/// The worker: claim the next job from the store, run it, until shutdown; with nothing to
/// claim, wait for a job queued here or for the next poll.
fn work(s: &AppState, queue: &(Mutex<Queue>, Condvar), me: &Worker) {
    let lock = || queue.0.lock().unwrap_or_else(PoisonError::into_inner);
    // Whether the last claim failed on the store, so an outage is logged once.
    let mut failing = false;
    loop {
        if lock().shutdown {
            return;
        }
        match s.access.store.claim_job(&me.owner, me.lease) {
            Ok(Some(claim)) => {
                failing = false;
                let id = claim.job.id.clone();
                let stop = Arc::new(AtomicBool::new(false));
                {
                    let mut q = lock();
                    // A shutdown that came meanwhile stops the job at its first step.
                    stop.store(q.shutdown, Ordering::Relaxed);
                    q.running = Some((id.clone(), stop.clone()));
                }
                if let Err(e) = run_job(s, claim, &stop, me) {
                    eprintln!("ferrolm serve: fine-tuning job {id}: {e}");
                }
                lock().running = None;
                continue;
            }
            Ok(None) => failing = false,
            Err(e) => {
                if !failing {
                    eprintln!("ferrolm serve: the fine-tuning worker cannot claim jobs: {e}; it tries again every {} s", poll_every(me.lease).as_secs_f64());
                }
                failing = true;
            }
        }
        let mut q = lock();
        if !q.woken && !q.shutdown {
            q = queue
                .1
                .wait_timeout(q, poll_every(me.lease))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        q.woken = false;
    }
}

/// Renews the worker's lease on a job every third of the lease, on a thread of its own, while
/// the job trains (a step may take longer than a lease); raises the job's stop flag once the
/// lease is lost: the job was cancelled or paused (through any replica), or taken over. A
/// renewal the store cannot answer is tried again at the next one. Stops when dropped.
struct LeaseKeeper {
    done: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseKeeper {
    fn start(s: &AppState, id: &str, me: &Worker, stop: &Arc<AtomicBool>) -> LeaseKeeper {
        let (done, wait) = mpsc::channel::<()>();
        let keep = {
            let (s, id, me, stop) = (s.clone(), id.to_owned(), me.clone(), stop.clone());
            move || loop {
                if !matches!(
                    wait.recv_timeout(me.lease / 3),
                    Err(mpsc::RecvTimeoutError::Timeout)
                ) {
                    return;
                }
                match s.access.store.renew_lease(&id, &me.owner, me.lease) {
                    Ok(true) => {}
                    Ok(false) => {
                        stop.store(true, Ordering::Relaxed);
                        return;
                    }
                    Err(e) => eprintln!("ferrolm serve: {id}: cannot renew the job's lease: {e}"),
                }
            }
        };
        let thread = std::thread::Builder::new()
            .name("ferrolm-lease".into())
            .spawn(keep);
        if let Err(e) = &thread {
            // Without renewals the lease runs out and another worker takes the job over: stop.
            eprintln!("ferrolm serve: {id}: cannot start the lease thread ({e}): the job stops");
            stop.store(true, Ordering::Relaxed);
        }
        LeaseKeeper {
            done: Some(done),
            thread: thread.ok(),
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Metrics of the run so far, for events and checkpoints.
#[derive(Default)]
struct Seen {
    total_steps: u64,
    train_loss: Option<f32>,
    /// (step, valid loss, token accuracy) of the latest evaluation.
    eval: Option<(u64, f32, Option<f32>)>,
    tokens_per_epoch: u64,
}

fn num(x: f32) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// Run a job this worker claimed to its end (or to a stop).
fn run_job(s: &AppState, claim: Claim, stop: &Arc<AtomicBool>, me: &Worker) -> Result<(), String> {
    let store = &s.access.store;
    let job = claim.job;
    let id = job.id.as_str();
    let epoch = job.epoch;
    let Some(t) = s.tuning.get() else {
        let _ = store.release_lease(id, &me.owner);
        return Ok(());
    };
    let _lease = LeaseKeeper::start(s, id, me, stop);
    let owner = me.owner.as_str();
    let message = match &claim.taken_from {
        None => format!("Worker {owner} claimed the job"),
        Some(was) => {
            format!("The lease of worker {was} ran out: worker {owner} takes the job over")
        }
    };
    log_event(store, id, "info", message, None);
    let out = t.run_dir(id);
    let (n_epochs, batch_size, learning_rate_multiplier) = hyper(&job.spec);
    // The training files as local files (fetched from the blob store on first use).
    let fetch = |f: &str| t.blobs.fetch_file(&file_key(f)).map_err(|e| e.to_string());
    let files = fetch(&job.training_file).and_then(|train| {
        let valid = job.validation_file.as_deref().map(fetch).transpose()?;
        Ok((train, valid))
    });
    let (training_file, validation_file) = match files {
        Ok(f) => f,
        Err(message) => return fail_job(store, id, owner, message),
    };
    // A run started elsewhere (another replica, or this one before its disk was lost) has
    // its checkpoints in the blob store: continue from the newest one recorded, in the
    // folder of the claim that recorded it. With object storage, a local copy left by an
    // earlier claim of this job may be older than the store's (another worker went on since,
    // mirroring each checkpoint): the store's is the run, and none recorded is a fresh start.
    if !t.blobs.is_local() {
        if out.exists() {
            if let Err(e) = std::fs::remove_dir_all(&out) {
                return fail_job(
                    store,
                    id,
                    owner,
                    format!("cannot clear {}: {e}", out.display()),
                );
            }
        }
        let newest = match store.job_checkpoints(id, None, 1) {
            Ok(p) => p.items.into_iter().next(),
            Err(e) => {
                // Not a fresh start over a run the store cannot name now: later, or elsewhere.
                let _ = store.release_lease(id, owner);
                return Err(format!("cannot read the job's checkpoints: {e}"));
            }
        };
        if let Some(c) = newest {
            if let Err(e) = t.blobs.fetch_dir(&run_blob_key(id, c.epoch), &run_key(id)) {
                let m =
                    format!("The run's checkpoints could not be fetched, so it starts over: {e}");
                log_event(store, id, "warn", m, None);
                let _ = std::fs::remove_dir_all(&out);
            }
        }
    }
    let spec = TrainSpec {
        base_model: job.model.clone(),
        training_file,
        validation_file,
        n_epochs,
        batch_size,
        learning_rate_multiplier,
        seed: job.spec["seed"].as_u64().unwrap_or(0),
        method: JobMethod::of(&job.spec),
        resume: out.join("finetune.json").is_file(),
        out,
    };
    let name = fine_tuned_name(&job);
    let mut seen = Seen::default();
    let mut on = |p: Progress| match p {
        Progress::Started {
            from_step,
            total_steps,
            tokens_per_epoch,
        } => {
            seen.total_steps = total_steps;
            seen.tokens_per_epoch = tokens_per_epoch;
            let message = if spec.resume && from_step > 0 {
                format!("Fine-tuning job resumed from the checkpoint at step {from_step} of {total_steps}")
            } else {
                format!("Fine-tuning job started: {total_steps} steps")
            };
            log_event(store, id, "info", message, None);
        }
        Progress::Step {
            step,
            train_loss,
            preference,
            extra,
        } => {
            seen.train_loss = Some(train_loss);
            if step % STEP_EVENT_EVERY == 0 || step == seen.total_steps {
                let mut data = json!({"step": step, "train_loss": num(train_loss), "total_steps": seen.total_steps});
                if let Some(p) = &preference {
                    p.put("train_", &mut data);
                }
                for (k, v) in &extra {
                    data[format!("train_{k}")] = v.clone();
                }
                let rl = extra
                    .get("reward_mean")
                    .and_then(Value::as_f64)
                    .map(|r| format!(", mean reward={r:.4}"))
                    .unwrap_or_default();
                log_event(
                    store,
                    id,
                    "info",
                    format!(
                        "Step {step}/{}: training loss={train_loss:.4}{}",
                        seen.total_steps,
                        preference
                            .map(|p| format!(
                                ", pair accuracy={:.3}, reward margin={:.4}",
                                p.pair_accuracy, p.reward_margin
                            ))
                            .unwrap_or(rl)
                    ),
                    Some(data),
                );
            }
        }
        Progress::Warning { message } => log_event(store, id, "warn", message, None),
        Progress::Eval {
            step,
            train_loss,
            valid_loss,
            token_accuracy,
            preference,
            extra,
        } => {
            seen.eval = Some((step, valid_loss, token_accuracy));
            let rl = extra
                .get("val_reward_mean")
                .and_then(Value::as_f64)
                .map(|r| format!(", validation mean reward={r:.4}"))
                .unwrap_or_default();
            if step > 0 || !rl.is_empty() {
                log_event(
                    store,
                    id,
                    "info",
                    if valid_loss.is_finite() {
                        format!("Step {step}/{}: training loss={train_loss:.4}, validation loss={valid_loss:.4}{rl}", seen.total_steps)
                    } else {
                        format!(
                            "Step {step}/{}: training loss={train_loss:.4}{rl}",
                            seen.total_steps
                        )
                    },
                    Some({
                        let mut data = json!({
                            "step": step,
                            "train_loss": num(train_loss),
                            "valid_loss": num(valid_loss),
                            "full_valid_loss": num(valid_loss),
                            "full_valid_mean_token_accuracy": token_accuracy.map_or(Value::Null, num),
                            "total_steps": seen.total_steps,
                        });
                        if let Some(p) = &preference {
                            p.put("full_valid_", &mut data);
                        }
                        for (k, v) in &extra {
                            let k = k.strip_prefix("val_").unwrap_or(k);
                            data[format!("full_valid_{k}")] = v.clone();
                        }
                        data
                    }),
                );
            }
        }
        Progress::Checkpoint { step } => {
            let mut metrics =
                json!({"step": step, "train_loss": seen.train_loss.map_or(Value::Null, num)});
            if let Some((_, loss, acc)) = seen.eval.filter(|e| e.0 == step) {
                metrics["valid_loss"] = num(loss);
                metrics["full_valid_loss"] = num(loss);
                metrics["full_valid_mean_token_accuracy"] = acc.map_or(Value::Null, num);
            }
            let c = JobCheckpoint {
                seq: 0,
                created_at: unix_s(),
                step,
                model: format!("{name}:ckpt-step-{step}"),
                metrics,
                epoch,
            };
            // The checkpoint into this claim's blob folder, then its record, which the store
            // accepts only while this claim is the job's current one.
            if let Err(e) = t.blobs.sync_dir(&run_key(id), &run_blob_key(id, epoch)) {
                let m = format!("The checkpoint at step {step} is not in the blob store, so it is not recorded: {e}");
                log_event(store, id, "warn", m, None);
                return;
            }
            match store.add_job_checkpoint(id, &c, owner) {
                Ok(true) => log_event(
                    store,
                    id,
                    "info",
                    format!("Checkpoint created at step {step}"),
                    None,
                ),
                Ok(false) => {
                    // Stalled past the lease: another worker claimed the job since.
                    eprintln!("ferrolm serve: {id}: worker {owner}'s claim (epoch {epoch}) was superseded: the checkpoint at step {step} is not recorded and the job stops here");
                    stop.store(true, Ordering::Relaxed);
                }
                Err(e) => eprintln!("ferrolm serve: {id}: could not record a checkpoint: {e}"),
            }
        }
    };
    let ended = (t.hooks.train)(&spec, stop, &mut on);
    let fail = |message: String| fail_job(store, id, owner, message);
    match ended {
        Err(message) => fail(message),
        // Cancelled or paused (the handler wrote the status), taken over, or the server is
        // stopping: then the job is still `running` under this lease, given up so that
        // another worker (or the next start) resumes it at once.
        Ok(end) if end.interrupted => {
            if let Ok(Some(j)) = store.job_by_id(id) {
                if j.status != "running" {
                    let m = format!(
                        "Worker {owner} stopped training at step {}: the job is {}",
                        end.steps, j.status
                    );
                    log_event(store, id, "info", m, None);
                }
            }
            store.release_lease(id, owner).map_err(|e| e.to_string())
        }
        Ok(end) => {
            let model = match s.read_run(&t.hooks, &spec.out, &spec.base_model, &name) {
                Ok(m) => m,
                Err(e) => return fail(format!("the trained model does not load: {e}")),
            };
            // The run is in the blob store before the job that names it succeeds.
            if let Err(e) = t.blobs.sync_dir(&run_key(id), &run_blob_key(id, epoch)) {
                return fail(format!("the run cannot be stored: {e}"));
            }
            let tokens = seen.tokens_per_epoch * u64::from(n_epochs);
            store
                .set_trained_tokens(id, tokens)
                .map_err(|e| e.to_string())?;
            if store
                .finish_job(
                    id,
                    "succeeded",
                    &["running"],
                    Some(owner),
                    Some(&name),
                    None,
                    unix_s(),
                )
                .map_err(|e| e.to_string())?
            {
                if let Err(e) = s.serve_run(model, &name, job.key_id) {
                    log_event(
                        store,
                        id,
                        "error",
                        format!("`{name}` cannot be served: {e}"),
                        None,
                    );
                    return Ok(());
                }
                log_event(
                    store,
                    id,
                    "info",
                    format!(
                        "The job has successfully completed after {} steps: `{name}` is served",
                        end.steps
                    ),
                    None,
                );
            }
            Ok(())
        }
    }
}

/// End a job running under `owner`'s lease as failed with `message` (an error event and the
/// job's error).
fn fail_job(store: &Store, id: &str, owner: &str, message: String) -> Result<(), String> {
    log_event(
        store,
        id,
        "error",
        format!("Fine-tuning job failed: {message}"),
        None,
    );
    let error = json!({"code": "training_failed", "message": message, "param": null});
    store
        .finish_job(
            id,
            "failed",
            &["running"],
            Some(owner),
            None,
            Some(&error),
            unix_s(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}
