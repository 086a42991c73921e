//! Instant rollback as an operator does it: edit the config file, then `kill -HUP` the
//! scheduler or run `flotilla reload`; an invalid file changes nothing.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use flotilla_testkit::{Behavior, MockUpstream};
use serde_json::json;

/// The scheduler's config: `tiny-llama` split between clouds `a` and `b` by weight.
fn config(a: &MockUpstream, b: &MockUpstream, weights: (u32, u32), extra: &str) -> String {
    format!(
        r#"
[scheduler]
listen = "127.0.0.1:0"
{extra}

[[scheduler.providers]]
name = "a"
base_url = "{}"

[[scheduler.providers]]
name = "b"
base_url = "{}"

[[scheduler.models]]
name = "tiny-llama"
strategy = "weighted"
local_weight = 0
cloud = [
  {{ provider = "a", model = "m", weight = {} }},
  {{ provider = "b", model = "m", weight = {} }},
]
"#,
        a.base_url(),
        b.base_url(),
        weights.0,
        weights.1
    )
}

/// Where the next request runs (`x-flotilla-target`).
async fn lands(url: &str) -> String {
    let r = http()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "tiny-llama", "max_tokens": 4,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["x-flotilla-target"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// Polls until requests land on `want` (a signal is handled asynchronously).
async fn lands_soon(url: &str, want: &str) -> bool {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if lands(url).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn hangup(proc: &Proc) {
    let pid = proc.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// `flotilla reload`: (succeeded, stdout, stderr).
fn reload(url: &str) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(["reload", "--scheduler-url", url])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn sighup_and_flotilla_reload_move_the_split_and_refuse_a_bad_file() {
    let a = MockUpstream::start(Behavior::reply("a")).await.unwrap();
    let b = MockUpstream::start(Behavior::reply("b")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &config(&a, &b, (1, 0), ""));
    let (mut sched, url) = spawn(&["scheduler", "--config", &path]);
    assert_eq!(lands(&url).await, "cloud:a");

    // SIGHUP after an edit: the next requests go to b.
    write_config(dir.path(), &config(&a, &b, (0, 1), ""));
    hangup(&sched);
    assert!(
        lands_soon(&url, "cloud:b").await,
        "SIGHUP applied the new weights"
    );

    // `flotilla reload` after another edit: back to a, and it says what changed.
    write_config(dir.path(), &config(&a, &b, (1, 0), ""));
    let (ok, out, err) = reload(&url);
    assert!(ok, "{err}");
    assert!(out.contains("reloaded: groups"), "{out}");
    assert_eq!(lands(&url).await, "cloud:a");
    // A change that needs a restart is named, and the rest applies.
    write_config(dir.path(), &config(&a, &b, (0, 1), "max_body_bytes = 2048"));
    let (ok, out, err) = reload(&url);
    assert!(ok, "{err}");
    assert!(
        out.contains("kept until a restart: max_body_bytes"),
        "{out}"
    );
    assert_eq!(lands(&url).await, "cloud:b");

    // An invalid file: refused whole with every problem named, the running config stays,
    // through the CLI and through SIGHUP alike.
    write_config(
        dir.path(),
        &config(&a, &b, (1, 0), "sla_attainment = 2.0\nmax_attempts = 0"),
    );
    let (ok, _, err) = reload(&url);
    assert!(!ok);
    assert!(
        err.contains("sla_attainment") && err.contains("max_attempts"),
        "{err}"
    );
    hangup(&sched);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        assert_eq!(lands(&url).await, "cloud:b");
    }
    assert!(sched.0.try_wait().unwrap().is_none(), "still running");
    sigterm(&sched);
    assert!(wait_exit(&mut sched, Duration::from_secs(30)).success());
}
