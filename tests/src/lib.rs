//! Harness for whole-system tests: a scheduler and agents on `127.0.0.1:0` in this process,
//! the project's own test model made once per test binary, and small HTTP helpers.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use std::sync::Arc;

use flotilla_agent::{Agent, AgentSection, DrainHandle, Models};
use flotilla_engine::{TextEngine, TextEngineConfig};
use flotilla_gateway::{Scheduler, SchedulerSection};
use flotilla_gpu::GpuProbe;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The tiny test model, written once per test process into a directory that lives as
/// long as the process.
pub fn test_model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-e2e-model")
            .tempdir()
            .expect("tempdir")
            .keep();
        flotilla_engine::make_test_model(&dir).expect("make test model");
        dir
    })
}

pub fn load_tiny(max_running: usize) -> TextEngine {
    TextEngine::load(
        "tiny-llama",
        test_model_dir(),
        TextEngineConfig {
            max_num_seqs: max_running,
            ..TextEngineConfig::default()
        },
    )
    .expect("load tiny-llama")
}

/// A running server and the means to stop it.
pub struct Running {
    pub url: String,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Running {
    /// Graceful stop: waits until the server has finished.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// A scheduler with fast heartbeats, unless the section says otherwise.
pub fn scheduler_section() -> SchedulerSection {
    SchedulerSection {
        heartbeat_ms: 200,
        missed_heartbeats: 10,
        first_byte_timeout_ms: 5_000,
        // Tests of routing call without keys; the ledger tests turn keys on.
        auth: Some(flotilla_gateway::AuthMode::None),
        ..SchedulerSection::default()
    }
}

pub async fn start_scheduler(section: SchedulerSection) -> Running {
    start_scheduler_with(section, |_| {}).await
}

/// [`start_scheduler`], with `edit` applied to the validated config (to set secrets the
/// section would read from the environment).
pub async fn start_scheduler_with(
    section: SchedulerSection,
    edit: impl FnOnce(&mut flotilla_gateway::SchedulerConfig),
) -> Running {
    let mut cfg = section.validate().expect("valid scheduler config");
    edit(&mut cfg);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    run_scheduler(Scheduler::new(listener, cfg).await.expect("scheduler"))
}

/// Runs `scheduler` on its listener until the returned handle stops it.
fn run_scheduler(scheduler: Scheduler) -> Running {
    let url = format!("http://{}", scheduler.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        scheduler.run(token).await.expect("scheduler run");
    });
    Running {
        url,
        shutdown,
        task,
    }
}

/// A scheduler whose config reloads (`POST /admin/v1/reload`) from whatever section
/// `source` holds at the time: the file a real deployment would re-read.
pub async fn start_reloadable_scheduler(
    source: Arc<std::sync::Mutex<SchedulerSection>>,
) -> Running {
    let section = source.lock().expect("section").clone();
    let cfg = section.validate().expect("valid scheduler config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let scheduler = Scheduler::new(listener, cfg).await.expect("scheduler");
    scheduler.state().set_loader(Arc::new(move || {
        source.lock().map_err(|e| vec![e.to_string()])?.validate()
    }));
    run_scheduler(scheduler)
}

/// An agent serving `models`, registered with `scheduler_url` before this returns.
pub async fn start_agent(scheduler_url: &str, node_id: &str, models: Models) -> Running {
    start_agent_with(scheduler_url, node_id, models, |_| {}, None)
        .await
        .0
}

/// Like [`start_agent`], with the section adjusted by `edit` and GPUs read by `probe`;
/// also returns the handle that drains the agent.
pub async fn start_agent_with(
    scheduler_url: &str,
    node_id: &str,
    models: Models,
    edit: impl FnOnce(&mut AgentSection),
    probe: Option<Arc<dyn GpuProbe>>,
) -> (Running, DrainHandle) {
    let mut section = AgentSection {
        node_id: Some(node_id.into()),
        scheduler_url: Some(scheduler_url.into()),
        heartbeat_ms: 200,
        ..AgentSection::default()
    };
    edit(&mut section);
    let cfg = section.validate().expect("valid agent config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut agent = Agent::with_models(listener, cfg, models).expect("agent");
    if let Some(p) = probe {
        agent = agent.with_probe(p);
    }
    let drain = agent.drain_handle();
    let url = agent.base_url().to_owned();
    agent.register().await.expect("register");
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        agent.run(token).await.expect("agent run");
    });
    (
        Running {
            url,
            shutdown,
            task,
        },
        drain,
    )
}

pub fn chat_models(engine: TextEngine) -> Models {
    let mut m = Models::default();
    m.chat.insert(engine.name().to_owned(), engine);
    m
}

pub fn client() -> reqwest::Client {
    // Every request in the tests is bounded: a hung connection fails the test instead of
    // hanging it.
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

pub fn chat_body(model: &str, content: &str, extra: Value) -> Value {
    let mut body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
    });
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
    body
}

/// The result of reading an SSE body to its end.
#[derive(Debug, Default)]
pub struct SseRead {
    /// `data:` payloads parsed as JSON, in order (without `[DONE]`).
    pub events: Vec<Value>,
    pub saw_done: bool,
    /// Events after `[DONE]` (must be none).
    pub after_done: usize,
    pub raw: String,
}

impl SseRead {
    /// Concatenated `delta.content` (chat) or `text` (completions) of choice 0.
    pub fn text(&self) -> String {
        self.events
            .iter()
            .filter_map(|e| e.pointer("/choices/0"))
            .filter_map(|c| {
                c.pointer("/delta/content")
                    .or_else(|| c.get("text"))
                    .and_then(Value::as_str)
            })
            .collect()
    }
}

pub async fn read_sse(resp: reqwest::Response) -> SseRead {
    let raw = resp.text().await.expect("read stream");
    let mut out = SseRead {
        raw: raw.clone(),
        ..SseRead::default()
    };
    let mut dec = flotilla_api::sse::SseDecoder::new();
    for ev in dec.feed(raw.as_bytes()) {
        if ev.is_done() {
            out.saw_done = true;
        } else if out.saw_done {
            out.after_done += 1;
        } else {
            out.events
                .push(serde_json::from_str(&ev.data).expect("event is JSON"));
        }
    }
    out
}

/// POSTs `body` as JSON to `url`.
pub async fn post(url: &str, body: &Value) -> reqwest::Response {
    client().post(url).json(body).send().await.expect("send")
}

/// POSTs `body` and parses the answer as JSON, whatever its status.
pub async fn post_json(url: &str, body: &Value) -> Value {
    post(url, body).await.json().await.expect("JSON answer")
}

pub async fn get_json(url: &str) -> Value {
    client()
        .get(url)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("JSON answer")
}

/// Sequences decoding now on an agent's `tiny-llama` engine, from its `/status`.
pub async fn engine_running(agent_url: &str) -> u64 {
    let status = get_json(&format!("{agent_url}/status")).await;
    status["engines"]["tiny-llama"]["running"]
        .as_u64()
        .expect("running")
}

/// Starts a streamed greedy chat of up to 2000 tokens through the scheduler at `sched_url`:
/// long enough to hold an engine slot while a test does something else.
pub async fn start_long_stream(sched_url: &str) -> reqwest::Response {
    let body = chat_body(
        "tiny-llama",
        "long",
        serde_json::json!({"max_tokens": 2000, "temperature": 0, "stream": true}),
    );
    post(&format!("{sched_url}/v1/chat/completions"), &body).await
}

/// A cloud provider at `base_url`, without a key.
pub fn provider(name: &str, base_url: &str) -> flotilla_providers::ProviderConfig {
    flotilla_providers::ProviderConfig::new(name, base_url)
}

/// Where the scheduler sent the request (`x-flotilla-target`).
pub fn target(resp: &reqwest::Response) -> String {
    resp.headers()["x-flotilla-target"]
        .to_str()
        .expect("ASCII header")
        .to_owned()
}

/// Registers a node with `max_running` slots for `tiny-llama` whose OpenAI API is
/// `base_url` (without `/v1`), as an agent's heartbeat would.
pub async fn register_node(sched_url: &str, node_id: &str, base_url: &str, max_running: u64) {
    use flotilla_api::protocol::{HEARTBEAT_PATH, ModelKind, NodeModel, NodeReport};
    let report = NodeReport::new(
        node_id,
        base_url,
        vec![NodeModel::idle(
            "tiny-llama",
            ModelKind::Chat,
            2048,
            max_running,
        )],
    );
    let r = client()
        .post(format!("{sched_url}{HEARTBEAT_PATH}"))
        .json(&report)
        .send()
        .await
        .expect("send heartbeat");
    assert_eq!(r.status(), 200);
}

/// Polls `cond` every 10 ms for up to 5 s; false if it never held.
pub async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// The value of the first `/metrics` line starting with `line_start` (a name with labels).
pub async fn metric(url: &str, line_start: &str) -> Option<f64> {
    let text = client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A SQLite ledger file in a fresh directory (kept for the test's life).
pub fn sqlite_url() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    (dir, url)
}

/// A scheduler with one cloud-only model `m` on provider `p` at `base_url` (prices as
/// given) and a ledger at `url` flushed every 20 ms.
pub fn ledger_section(
    base_url: &str,
    prices: Option<flotilla_providers::Price>,
    url: &str,
) -> SchedulerSection {
    use flotilla_gateway::{LedgerSection, ModelSection};
    use flotilla_scheduler::{CloudTarget, Strategy};
    let mut p = provider("p", base_url);
    if let Some(pr) = prices {
        p.prices.insert("p-model".into(), pr);
    }
    SchedulerSection {
        providers: vec![p],
        models: vec![ModelSection {
            strategy: Some(Strategy::CloudOnly),
            ..ModelSection::new("m", vec![CloudTarget::new("p", "p-model")])
        }],
        ledger: LedgerSection {
            url: Some(url.to_owned()),
            flush_ms: 20,
            batch: 512,
            ..LedgerSection::default()
        },
        ..scheduler_section()
    }
}

/// The ledger rows of `model`, newest first, once `n` of them are there.
pub async fn ledger_rows(
    sched_url: &str,
    model: &str,
    n: usize,
    bearer: Option<&str>,
) -> Vec<Value> {
    for _ in 0..300 {
        let mut req = client().get(format!(
            "{sched_url}/admin/v1/requests?model={model}&limit=1000"
        ));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        let data = v["data"].as_array().cloned().unwrap_or_default();
        if data.len() >= n {
            return data;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {n} ledger rows for {model}");
}

/// Makes an API key in the ledger at `ledger` (as `flotilla keys create` does), adjusted by
/// `f`; returns its secret.
pub async fn new_key(
    ledger: &flotilla_state::Ledger,
    name: &str,
    f: impl FnOnce(&mut flotilla_state::NewKey),
) -> String {
    let mut k = flotilla_state::NewKey {
        name: name.into(),
        budget_usd: None,
        rpm: None,
        tpm: None,
        admin: false,
    };
    f(&mut k);
    ledger.create_key(&k).await.unwrap().1
}

/// The whole seconds of a response's `Retry-After` header (which must be there).
pub fn retry_after_secs(resp: &reqwest::Response) -> u64 {
    resp.headers()["retry-after"]
        .to_str()
        .expect("ASCII Retry-After")
        .parse()
        .expect("Retry-After in whole seconds")
}
