//! The harness the process tests share: the built binary spawned with its ledger in a
//! directory of its own, its `listening on` line read from stdout, and killed at the end.
#![allow(dead_code, reason = "each test binary uses a part of the harness")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// Kills the child when the test ends, whatever happens.
/// Its data directory (the ledger) lives as long as it does.
pub struct Proc(
    pub Child,
    pub Arc<Mutex<Vec<String>>>,
    #[allow(dead_code, reason = "held until the process is gone")] pub tempfile::TempDir,
);

impl Proc {
    /// Lines printed on stdout after the `listening on` line (there must be none).
    pub fn extra_stdout(&self) -> Vec<String> {
        self.1.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `flotilla ARGS` (without API keys, its ledger in a directory of its own) and
/// returns it with the address from its one stdout line.
pub fn spawn(args: &[&str]) -> (Proc, String) {
    spawn_with(
        args,
        &[("FLOTILLA_AUTH", "none")],
        tempfile::tempdir().unwrap(),
    )
}

pub fn spawn_with(args: &[&str], env: &[(&str, &str)], data: tempfile::TempDir) -> (Proc, String) {
    spawn_logging(args, env, data, Stdio::inherit())
}

/// [`spawn_with`], its log going to `stderr`.
pub fn spawn_logging(
    args: &[&str],
    env: &[(&str, &str)],
    data: tempfile::TempDir,
    stderr: Stdio,
) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("FLOTILLA_LOG", "warn")
        .env("FLOTILLA_DATA_DIR", data.path())
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn flotilla");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let extra = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&extra);
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok);
        let _ = tx.send(first);
        // Anything more on stdout breaks the one-line contract; the tests check.
        for line in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let proc = Proc(child, extra, data);
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("no listening line in 120 s")
        .expect("stdout closed");
    let url = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    (proc, url)
}

/// `flotilla agent` registering with `sched_url` as `node_id`, models made under `cache`.
pub fn spawn_agent(
    sched_url: &str,
    node_id: &str,
    cache: &std::path::Path,
    extra: &[&str],
) -> (Proc, String) {
    let cache = cache.to_str().unwrap();
    let mut args = vec![
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--scheduler-url",
        sched_url,
        "--node-id",
        node_id,
        "--cache-dir",
        cache,
    ];
    args.extend_from_slice(extra);
    spawn(&args)
}

/// GETs `url` and parses the answer as JSON.
pub async fn get_json(url: &str) -> Value {
    http().get(url).send().await.unwrap().json().await.unwrap()
}

/// An HTTP client whose every request is bounded.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

pub fn run_ok(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn write_config(dir: &std::path::Path, toml: &str) -> String {
    let path = dir.join("flotilla.toml");
    std::fs::write(&path, toml).unwrap();
    path.to_str().unwrap().to_owned()
}

pub fn sigterm(proc: &Proc) {
    let pid = proc.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// Waits for the process to exit by itself; its exit status.
pub fn wait_exit(proc: &mut Proc, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(code) = proc.0.try_wait().unwrap() {
            return code;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not exit in {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
