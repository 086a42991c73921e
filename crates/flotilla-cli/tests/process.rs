//! The built binary as users run it: spawned, its `listening on` line read from stdout.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn up_serves_chat_from_the_binary() {
    let cache = tempfile::tempdir().unwrap();
    let (mut proc, url) = spawn(&[
        "up",
        "--listen",
        "127.0.0.1:0",
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ]);
    // The built-in model was made on first run.
    assert!(
        cache
            .path()
            .join("tiny-llama")
            .join("model.safetensors")
            .is_file()
    );

    let c = http();
    let resp = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-flotilla-target"],
        "local:local/tiny-llama"
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 4);

    assert!(proc.extra_stdout().is_empty(), "{:?}", proc.extra_stdout());

    // SIGTERM drains and exits cleanly.
    sigterm(&proc);
    let code = wait_exit(&mut proc, Duration::from_secs(20));
    assert!(code.success(), "exit status {code}");
}

#[tokio::test]
async fn scheduler_and_agent_as_separate_processes() {
    let cache = tempfile::tempdir().unwrap();
    let (_sched, sched_url) = spawn(&["scheduler", "--listen", "127.0.0.1:0"]);
    let (_agent, agent_url) = spawn_agent(&sched_url, "gpu-1", cache.path(), &[]);
    let c = http();
    // The agent answers directly too.
    let models = get_json(&format!("{agent_url}/v1/models")).await;
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "tiny-llama")
    );
    let resp = c
        .post(format!("{sched_url}/v1/chat/completions"))
        .json(&json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-flotilla-target"],
        "local:gpu-1/tiny-llama"
    );
    assert!(resp.text().await.unwrap().ends_with("data: [DONE]\n\n"));
}

/// Runs `flotilla scheduler --check-config` on `toml`; returns success and stderr.
fn check_config(toml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(BIN)
        .args([
            "scheduler",
            "--check-config",
            "--config",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_reports_every_problem_and_fails() {
    let models =
        "[[scheduler.models]]\nname = \"m\"\ncloud = [{ provider = \"ghost\", model = \"x\" }]\n";
    let (ok, err) = check_config(&format!(
        "[scheduler]\nmissed_heartbeats = 0\ntypo_key = 1\n{models}"
    ));
    assert!(!ok);
    assert!(err.contains("scheduler.typo_key: unknown key"), "{err}");
    // Unknown keys are reported first; without the typo the value errors come together.
    let (ok, err) = check_config(&format!("[scheduler]\nmissed_heartbeats = 0\n{models}"));
    assert!(!ok);
    assert!(
        err.contains("missed_heartbeats") && err.contains("`ghost`"),
        "{err}"
    );
}

#[test]
fn an_exposed_scheduler_without_a_cluster_token_does_not_start() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let run = |extra: &[&str], token: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.args(["scheduler", "--listen", "0.0.0.0:0", "--data-dir", dir])
            .args(extra)
            .env_remove("FLOTILLA_CLUSTER_TOKEN")
            .env_remove("FLOTILLA_ALLOW_INSECURE");
        if let Some(t) = token {
            cmd.env("FLOTILLA_CLUSTER_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    for extra in [&[][..], &["--check-config"][..]] {
        let out = run(extra, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?}: {err}");
        assert!(
            err.contains("refusing to serve on 0.0.0.0") && err.contains("cluster token"),
            "{err}"
        );
    }
    // The token from the environment (no config needed), or an explicit allow_insecure.
    let out = run(&["--check-config"], Some("t0ken"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["--check-config", "--allow-insecure"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/flotilla.toml");
    let out = Command::new(BIN)
        .args(["up", "--check-config", "--config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "configuration is valid"
    );
}

/// The Kubernetes config in deploy/ is valid for both halves, given the Secret's variables.
#[test]
fn the_deploy_config_is_valid() {
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/k8s/flotilla.toml"
    );
    for cmd in ["scheduler", "agent"] {
        let out = Command::new(BIN)
            .args([cmd, "--check-config", "--config", config])
            .env(
                "FLOTILLA_LEDGER_URL",
                "postgres://flotilla:pw@db:5432/flotilla",
            )
            .env("FLOTILLA_ADMIN_TOKEN", "admin")
            .env("FLOTILLA_CLUSTER_TOKEN", "cluster")
            .env("OPENAI_API_KEY", "sk-test")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn make_test_is_deterministic() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [&a, &b] {
        let out = Command::new(BIN)
            .args(["models", "make-test", d.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let x = std::fs::read(a.path().join(f)).unwrap();
        let y = std::fs::read(b.path().join(f)).unwrap();
        assert!(!x.is_empty());
        assert!(x == y, "{f} differs between two runs");
    }
}

/// The benchmark and the GGUF converter run end to end (on the tiny model, for speed; the
/// figures themselves are in BENCHMARKS.md).
#[test]
fn bench_engine_and_to_gguf_run() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("m");
    let m = model.to_str().unwrap();
    run_ok(&["models", "make-test", m, "--size", "tiny"]);
    let out = run_ok(&[
        "bench",
        "engine",
        "--model",
        m,
        "--concurrency",
        "1,2",
        "--new-tokens",
        "16",
        "--prompt-tokens",
        "8",
        "--prefill-tokens",
        "32",
        "--json",
    ]);
    let r: Value = serde_json::from_str(&out).unwrap();
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows[1]["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["baseline_decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    let gguf = d.path().join("q8").join("model.gguf");
    run_ok(&[
        "models",
        "to-gguf",
        m,
        gguf.to_str().unwrap(),
        "--quant",
        "q8_0",
    ]);
    assert!(gguf.is_file());
    assert!(d.path().join("q8").join("tokenizer.json").is_file());
}

/// SIGTERM while streams run and queue on the agent: every stream completes in full, then
/// the agent exits 0 and is gone from the scheduler's fleet.
#[tokio::test]
async fn sigterm_drains_running_streams_then_exits_and_leaves_the_fleet() {
    let cache = tempfile::tempdir().unwrap();
    let (_sched, sched_url) = spawn(&["scheduler", "--listen", "127.0.0.1:0"]);
    // One batch slot: the streams run one after another.
    let config = write_config(
        cache.path(),
        "[agent]\n[[agent.models]]\nname = \"tiny-llama\"\nsource = \"builtin:tiny-llama\"\nmax_num_seqs = 1\n",
    );
    let (mut agent, _) = spawn_agent(&sched_url, "gpu-1", cache.path(), &["--config", &config]);
    let c = http();
    let nodes = |url: String| async move {
        get_json(&format!("{url}/admin/v1/nodes")).await["nodes"]
            .as_array()
            .unwrap()
            .clone()
    };
    assert_eq!(nodes(sched_url.clone()).await[0]["node_id"], "gpu-1");

    let body = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "stream"}],
                      "max_tokens": 300, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}});
    let mut streams = Vec::new();
    for _ in 0..3 {
        let resp = c
            .post(format!("{sched_url}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        streams.push(tokio::spawn(async move { resp.text().await.unwrap() }));
    }
    sigterm(&agent);
    let running_at_sigterm = streams.iter().filter(|s| !s.is_finished()).count();
    assert!(
        running_at_sigterm > 0,
        "SIGTERM came after every stream ended"
    );

    for s in streams {
        let text = s.await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert!(!text.contains("\"error\""), "{text}");
        assert!(text.contains("\"completion_tokens\":300"), "{text}");
    }
    let code = wait_exit(&mut agent, Duration::from_secs(30));
    assert!(code.success(), "agent exit status {code}");
    assert!(
        nodes(sched_url.clone()).await.is_empty(),
        "the drained node deregistered"
    );
}

/// `agent --plan` on described GPUs: the placement table, and a refusal naming the
/// shortfall with a non-zero exit; nothing is downloaded or loaded.
#[test]
fn agent_plan_places_on_described_gpus_and_refuses_what_cannot_fit() {
    let dir = tempfile::tempdir().unwrap();
    let hub = dir.path().join("empty-hub");
    std::fs::create_dir_all(&hub).unwrap();
    let gpus = "[[agent.fixed_gpus]]\nname = \"NVIDIA L4\"\nmemory_gib = 24\n\
                [[agent.fixed_gpus]]\nname = \"NVIDIA A100 80GB\"\nmemory_gib = 80\n";
    let model = |name: &str, repo: &str| {
        format!(
            "[[agent.models]]\nname = \"{name}\"\nsource = \"{repo}\"\nkv_cache_bytes = 2147483648\n"
        )
    };
    let head = format!(
        "[agent]\noffline = true\nhf_cache_dir = \"{}\"\n",
        hub.display()
    );
    let both = write_config(
        dir.path(),
        &format!(
            "{head}{gpus}{}{}",
            model("llama-8b", "meta-llama/Llama-3.1-8B-Instruct"),
            model("llama-70b", "meta-llama/Llama-3.1-70B-Instruct")
        ),
    );
    let out = Command::new(BIN)
        .args(["agent", "--plan", "--config", &both])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("llama-8b "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        row.contains("cuda:0") && row.contains("catalog:llama-3.1-8b"),
        "{row}"
    );
    let refusal = stdout
        .lines()
        .find(|l| l.starts_with("llama-70b "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        refusal.contains("REFUSED") && refusal.contains("GPU 1 (NVIDIA A100 80GB)"),
        "{refusal}"
    );
    assert!(refusal.contains("short"), "{refusal}");
    assert!(stderr.contains("1 model(s) fit on no device"), "{stderr}");
    assert!(stdout.contains("note: GPUs described"), "{stdout}");

    let one = write_config(
        dir.path(),
        &format!(
            "{head}{gpus}{}",
            model("llama-8b", "meta-llama/Llama-3.1-8B-Instruct")
        ),
    );
    let stdout = run_ok(&["agent", "--plan", "--config", &one]);
    assert!(!stdout.contains("REFUSED"), "{stdout}");
    // Nothing was fetched into the hub cache.
    assert_eq!(std::fs::read_dir(&hub).unwrap().count(), 0);
}

/// `flotilla status` draws what the scheduler knows of its fleet.
#[tokio::test]
async fn status_shows_the_fleet() {
    let cache = tempfile::tempdir().unwrap();
    let (_sched, sched_url) = spawn(&["scheduler", "--listen", "127.0.0.1:0"]);
    let (_agent, _) = spawn_agent(&sched_url, "node-7", cache.path(), &[]);
    let out = run_ok(&["status", "--scheduler-url", &sched_url]);
    assert!(out.contains("node-7") && out.contains("healthy"), "{out}");
    assert!(out.contains("tiny-llama") && out.contains("host"), "{out}");
    // The agent's models are targets, with their breaker and whether they admit work.
    let row = out
        .lines()
        .find(|l| l.starts_with("local:node-7/tiny-llama "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("closed") && row.contains(" yes "), "{row}");
    assert!(out.contains("queues: nothing waiting"), "{out}");
    // Piped stdout is not coloured unless asked.
    assert!(!out.contains('\x1b'), "{out}");
    let coloured = run_ok(&["status", "--scheduler-url", &sched_url, "--color", "always"]);
    assert!(coloured.contains("\x1b[32mhealthy"), "{coloured}");
    let json: Value = serde_json::from_str(&run_ok(&[
        "status",
        "--scheduler-url",
        &sched_url,
        "--json",
    ]))
    .unwrap();
    assert_eq!(json["nodes"][0]["node_id"], "node-7");
    let target = json["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == "local:node-7/tiny-llama")
        .unwrap_or_else(|| panic!("{json}"));
    assert_eq!(target["breaker"], "closed");
    // A scheduler that is not there is one clear line, not a panic.
    let out = Command::new(BIN)
        .args(["status", "--scheduler-url", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: asking the scheduler at"), "{err}");
}

/// Keys made with the CLI on the ledger a running scheduler uses: a request without one is
/// refused, with one it is let through and written to the ledger, which the admin API (with
/// an admin key) and `flotilla report savings` read.
#[tokio::test]
async fn keys_made_by_the_cli_open_the_scheduler_and_the_ledger_reports() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_owned();
    let (_sched, url) = spawn_with(&["scheduler", "--listen", "127.0.0.1:0"], &[], data);
    let key = run_ok(&[
        "keys",
        "create",
        "--name",
        "app",
        "--data-dir",
        &dir,
        "--rpm",
        "100",
    ]);
    let key = key.trim().to_owned();
    assert!(key.starts_with("fl-"), "{key}");
    let admin = run_ok(&[
        "keys",
        "create",
        "--name",
        "ops",
        "--admin",
        "--data-dir",
        &dir,
    ]);
    let c = reqwest::Client::new();
    let body = json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]});
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "past auth, to routing");
    let mut rows = Value::Null;
    for _ in 0..100 {
        rows = c
            .get(format!("{url}/admin/v1/requests"))
            .bearer_auth(admin.trim())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if rows["data"].as_array().is_some_and(|d| !d.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rows["data"][0]["model"], "nope", "{rows}");
    assert_eq!(rows["data"][0]["http_status"], 404, "{rows}");
    let listed = run_ok(&["keys", "list", "--data-dir", &dir]);
    assert!(
        listed.contains("app") && listed.contains("admin") && !listed.contains(&key),
        "{listed}"
    );
    let report = run_ok(&["report", "savings", "--data-dir", &dir]);
    assert!(report.starts_with("DAY"), "{report}");
    run_ok(&["keys", "revoke", "app", "--data-dir", &dir]);
}

/// Runs `flotilla chat ARGS` with `stdin` piped in; returns (success, stdout, stderr).
fn chat(args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("chat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flotilla chat");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn chat_streams_each_answer_and_says_where_it_ran() {
    let cache = tempfile::tempdir().unwrap();
    let (_proc, url) = spawn(&[
        "up",
        "--listen",
        "127.0.0.1:0",
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ]);
    // No --model: the first listed model that generates text (minilm, when installed,
    // serves embeddings only and is passed over).
    let (ok, stdout, stderr) = chat(
        &["--scheduler-url", &url, "--max-tokens", "3"],
        "hello there\n/model\n\nand again\n/exit\nnot sent\n",
    );
    assert!(ok, "{stderr}");
    let summaries: Vec<&str> = stderr.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(summaries.len(), 2, "{stderr}");
    for s in &summaries {
        assert!(
            s.starts_with("[tiny-llama · local:local/tiny-llama · local_capacity · first token "),
            "{s}"
        );
        // At most 3 tokens; the usage chunk's count is shown.
        assert!(
            [" · 1 token", " · 2 tokens", " · 3 tokens"]
                .iter()
                .any(|n| s.contains(n)),
            "{s}"
        );
    }
    assert!(stderr.contains("model: tiny-llama"), "{stderr}");
    assert!(!stdout.trim().is_empty(), "the answers stream to stdout");

    // A model nobody serves: the server's message, and a failing exit for scripts.
    let (ok, _, stderr) = chat(
        &["--scheduler-url", &url, "--model", "no-such-model"],
        "hi\n",
    );
    assert!(!ok);
    assert!(
        stderr.contains("error: 404") && stderr.contains("no-such-model"),
        "{stderr}"
    );
    // No server: one clear line.
    let (ok, _, stderr) = chat(&["--scheduler-url", "http://127.0.0.1:1"], "hi\n");
    assert!(!ok);
    assert!(
        stderr.contains("error: asking http://127.0.0.1:1/v1/models"),
        "{stderr}"
    );
}

/// `models pull` of a repo already complete in a hub cache laid out by hand: no download
/// (the hub it would ask is a closed port), the snapshot named on stdout.
#[test]
fn models_pull_uses_a_complete_hub_cache_without_the_network() {
    let cache = tempfile::tempdir().unwrap();
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.path().join("models--org--name");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::write(snap.join(f), "{}").unwrap();
    }
    let out = Command::new(BIN)
        .args(["models", "pull", "org/name", "--cache-dir"])
        .arg(cache.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("org/name: 3 files") && stdout.contains(rev),
        "{stdout}"
    );
    // Not complete (no tokenizer) and no hub to ask: the file is named.
    std::fs::remove_file(snap.join("tokenizer.json")).unwrap();
    let out = Command::new(BIN)
        .args(["models", "pull", "org/name", "--cache-dir"])
        .arg(cache.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: pulling org/name") && err.contains("tokenizer.json"),
        "{err}"
    );
}

/// Every ledger row of the scheduler at `url` (all pages), by request id.
async fn ledger_ids(url: &str) -> std::collections::HashSet<String> {
    let c = http();
    let mut ids = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut req = c.get(format!("{url}/admin/v1/requests?limit=1000"));
        if let Some(cur) = &cursor {
            req = req.query(&[("cursor", cur)]);
        }
        let page: Value = req.send().await.unwrap().json().await.unwrap();
        for row in page["data"].as_array().expect("rows") {
            ids.insert(row["request_id"].as_str().expect("request_id").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return ids,
        }
    }
}

/// SIGKILL in the middle of load: the ledger (SQLite, WAL) opens cleanly on restart and
/// holds a row for every request answered before the last flush interval (200 ms) began.
#[tokio::test]
async fn sigkill_under_load_loses_no_ledger_row_older_than_one_flush() {
    const FLUSH: Duration = Duration::from_millis(200);
    let cache = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let up = || {
        spawn_with(
            &[
                "up",
                "--listen",
                "127.0.0.1:0",
                "--cache-dir",
                cache.path().to_str().unwrap(),
            ],
            &[("FLOTILLA_AUTH", "none"), ("FLOTILLA_DATA_DIR", &data_dir)],
            tempfile::tempdir().unwrap(),
        )
    };
    let (mut proc, url) = up();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (url, stop) = (url.clone(), Arc::clone(&stop));
        clients.push(tokio::spawn(async move {
            let c = http();
            let mut answered = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sent = c
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
                    .send()
                    .await;
                let Ok(resp) = sent else { break };
                let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
                if resp.status() == 200 && resp.bytes().await.is_ok() {
                    answered.push((id, std::time::Instant::now()));
                }
            }
            answered
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = std::time::Instant::now();
    proc.0.kill().unwrap();
    proc.0.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = Vec::new();
    for c in clients {
        answered.extend(c.await.unwrap());
    }
    assert!(answered.len() >= 20, "only {} answered", answered.len());

    // The same data directory: the ledger opens (the restart would fail otherwise).
    let (_proc, url) = up();
    let ids = ledger_ids(&url).await;
    let due: Vec<&String> = answered
        .iter()
        .filter(|(_, at)| killed_at.duration_since(*at) > FLUSH)
        .map(|(id, _)| id)
        .collect();
    let missing: Vec<&&String> = due.iter().filter(|id| !ids.contains(**id)).collect();
    let recent_kept = answered.len()
        - due.len()
        - answered
            .iter()
            .filter(|(id, at)| killed_at.duration_since(*at) <= FLUSH && !ids.contains(id))
            .count();
    println!(
        "answered {}, of them {} more than {FLUSH:?} before SIGKILL: {} without a row; rows kept of the last interval's {}: {recent_kept}",
        answered.len(),
        due.len(),
        missing.len(),
        answered.len() - due.len(),
    );
    assert!(missing.is_empty(), "rows lost: {missing:?}");
}

/// Sends `req`; its status, with its headers and body added to `seen`.
async fn call(seen: &mut String, req: reqwest::RequestBuilder) -> u16 {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    seen.push_str(&format!("{:?}\n", resp.headers()));
    seen.push_str(&resp.text().await.unwrap());
    status
}

/// Provider keys, client keys and admin keys never show in the log (at debug level), the
/// ledger database, `/metrics`, the admin API or any response, even when the provider
/// quotes its key back in an error.
#[tokio::test]
async fn secrets_never_reach_logs_ledger_metrics_or_error_bodies() {
    const PROVIDER_KEY: &str = "sk-provider-Zq81xVbT0pLmN4sK";
    let mock = flotilla_testkit::MockUpstream::start(flotilla_testkit::Behavior::reply("fine"))
        .await
        .unwrap();
    mock.push(flotilla_testkit::Behavior::Status {
        code: 401,
        retry_after_s: None,
        message: format!("Incorrect API key provided: {PROVIDER_KEY}."),
    });
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_owned();
    let key = run_ok(&["keys", "create", "--name", "app", "--data-dir", &dir]);
    let admin = run_ok(&[
        "keys",
        "create",
        "--name",
        "ops",
        "--admin",
        "--data-dir",
        &dir,
    ]);
    let (key, admin) = (key.trim().to_owned(), admin.trim().to_owned());
    let config = write_config(
        data.path(),
        &format!(
            r#"
[scheduler]
listen = "127.0.0.1:0"

[[scheduler.providers]]
name = "mock"
base_url = "{}"
api_key_env = "FLOTILLA_TEST_PROVIDER_KEY"

[[scheduler.models]]
name = "m"
strategy = "cloud-only"
cloud = [{{ provider = "mock", model = "mock-model" }}]
"#,
            mock.base_url()
        ),
    );
    let log_path = data.path().join("scheduler.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let (mut proc, url) = spawn_logging(
        &["scheduler", "--config", &config],
        &[
            ("FLOTILLA_LOG", "debug"),
            ("FLOTILLA_DATA_DIR", &dir),
            ("FLOTILLA_TEST_PROVIDER_KEY", PROVIDER_KEY),
        ],
        tempfile::tempdir().unwrap(),
        Stdio::from(log),
    );
    let c = http();
    let mut seen = String::new();
    let chat =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let completions = format!("{url}/v1/chat/completions");
    // The provider refuses our key and quotes it back; the client is told the target failed.
    let status = call(
        &mut seen,
        c.post(&completions).bearer_auth(&key).json(&chat),
    )
    .await;
    assert_eq!(status, 503, "{seen}");
    assert!(
        seen.contains("[redacted]"),
        "the quoted key is struck out: {seen}"
    );
    assert_eq!(
        call(
            &mut seen,
            c.post(&completions).bearer_auth(&key).json(&chat)
        )
        .await,
        200
    );
    let stream =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    assert_eq!(
        call(
            &mut seen,
            c.post(&completions).bearer_auth(&key).json(&stream)
        )
        .await,
        200
    );
    let wrong = format!("{key}x");
    assert_eq!(
        call(
            &mut seen,
            c.post(&completions).bearer_auth(&wrong).json(&chat)
        )
        .await,
        401
    );
    assert_eq!(
        call(
            &mut seen,
            c.post(&completions).bearer_auth(&key).body("{not json")
        )
        .await,
        400
    );
    assert_eq!(
        call(
            &mut seen,
            c.get(format!("{url}/admin/v1/requests")).bearer_auth(&key)
        )
        .await,
        401,
        "a client key does not open the admin API"
    );
    for path in [
        "/admin/v1/requests",
        "/admin/v1/keys",
        "/admin/v1/targets",
        "/metrics",
    ] {
        assert_eq!(
            call(&mut seen, c.get(format!("{url}{path}")).bearer_auth(&admin)).await,
            200,
            "{path}"
        );
    }
    // The provider did get its key: the check below would be empty otherwise.
    let sent = mock.requests();
    assert_eq!(
        sent[0].authorization.as_deref(),
        Some(&*format!("Bearer {PROVIDER_KEY}"))
    );
    // Every row written before the ledger is read on disk.
    sigterm(&proc);
    assert!(wait_exit(&mut proc, Duration::from_secs(20)).success());

    let mut places = vec![("responses", seen.into_bytes())];
    places.push(("log", std::fs::read(&log_path).unwrap()));
    for entry in std::fs::read_dir(data.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("ledger.db") {
            places.push(("ledger", std::fs::read(&path).unwrap()));
        }
    }
    assert!(places.iter().any(|(w, b)| *w == "ledger" && !b.is_empty()));
    let log = String::from_utf8_lossy(&places[1].1).into_owned();
    assert!(
        log.contains("DEBUG") || log.contains("INFO"),
        "the log was captured: {log}"
    );
    for (what, bytes) in &places {
        let text = String::from_utf8_lossy(bytes);
        for (name, secret) in [
            ("provider key", PROVIDER_KEY),
            ("client key", &*key),
            ("admin key", &*admin),
        ] {
            assert!(!text.contains(secret), "the {name} is in the {what}");
        }
    }
}

/// How one stream of [`an_agent_killed_mid_stream_loses_no_request`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Ended {
    /// `[DONE]`, no error event.
    Completed,
    /// An explicit error event, no `[DONE]`.
    ErrorEvent,
    /// An HTTP error status before any stream.
    HttpError,
    /// The body ended with neither: a silent truncation.
    Truncated,
    /// Still open after 60 s.
    Hung,
}

/// kill -9 of an agent while 12 streams run on it (and more wait for its slots): each
/// stream continues on the cloud fallback (`mid_stream = "continue"`) or ends with an
/// explicit error event; none hangs and none ends silently cut.
#[tokio::test]
async fn an_agent_killed_mid_stream_loses_no_request() {
    let cloud = flotilla_testkit::MockUpstream::start(flotilla_testkit::Behavior::reply(
        "and the cloud finished it",
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sched_config = write_config(
        dir.path(),
        &format!(
            r#"
[scheduler]
listen = "127.0.0.1:0"
heartbeat_ms = 200

[[scheduler.providers]]
name = "cloud"
base_url = "{}"
continues_messages = true

[[scheduler.models]]
name = "tiny-llama"
mid_stream = "continue"
max_queue_depth = 64
cloud = [{{ provider = "cloud", model = "cloud-model" }}]
"#,
            cloud.base_url()
        ),
    );
    let (_sched, sched_url) = spawn(&["scheduler", "--config", &sched_config]);
    let cache = tempfile::tempdir().unwrap();
    let agent_config = write_config(
        cache.path(),
        "[agent]\n[[agent.models]]\nname = \"tiny-llama\"\nsource = \"builtin:tiny-llama\"\nmax_num_seqs = 8\n",
    );
    let (mut agent, _) = spawn_agent(
        &sched_url,
        "doomed",
        cache.path(),
        &["--config", &agent_config],
    );
    let body = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "stream"}],
                      "max_tokens": 400, "ignore_eos": true, "stream": true});
    let c = http();
    let mut streams = Vec::new();
    let (tx, mut first_tokens) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..12 {
        let (c, url, body, tx) = (c.clone(), sched_url.clone(), body.clone(), tx.clone());
        streams.push(tokio::spawn(async move {
            let ended = tokio::time::timeout(Duration::from_secs(60), async {
                let Ok(mut resp) = c
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .await
                else {
                    return Ended::HttpError;
                };
                if resp.status() != 200 {
                    return Ended::HttpError;
                }
                let mut text = String::new();
                while let Ok(Some(chunk)) = resp.chunk().await {
                    if text.is_empty() {
                        let _ = tx.send(());
                    }
                    text.push_str(&String::from_utf8_lossy(&chunk));
                }
                match (text.contains("data: [DONE]"), text.contains("\"error\"")) {
                    (true, false) => Ended::Completed,
                    (false, true) => Ended::ErrorEvent,
                    _ => Ended::Truncated,
                }
            })
            .await;
            ended.unwrap_or(Ended::Hung)
        }));
    }
    // Kill once the agent's 8 slots stream (the other 4 wait in the scheduler's queue).
    for _ in 0..8 {
        tokio::time::timeout(Duration::from_secs(30), first_tokens.recv())
            .await
            .expect("streams started");
    }
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    let mut counts = std::collections::HashMap::new();
    for s in streams {
        *counts.entry(s.await.unwrap()).or_insert(0) += 1;
    }
    println!(
        "12 streams after kill -9 of their agent: {counts:?}; cloud asked {} times",
        cloud.hits()
    );
    for bad in [Ended::Hung, Ended::Truncated] {
        assert_eq!(counts.get(&bad), None, "{counts:?}");
    }
    assert!(
        counts.get(&Ended::Completed).copied().unwrap_or(0) >= 8,
        "the streams running on the agent went on in the cloud: {counts:?}"
    );
}
