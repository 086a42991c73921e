use std::path::Path;

use flotilla_engine::resolve_model_source;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
async fn local_directory_is_returned_as_is() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("config.json"), "{}");
    let got = resolve_model_source(dir.path().to_str().unwrap(), None, true)
        .await
        .unwrap();
    assert_eq!(got, dir.path());
    let empty = tempfile::tempdir().unwrap();
    let err = resolve_model_source(empty.path().to_str().unwrap(), None, true)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[tokio::test]
async fn offline_resolves_from_hand_made_hf_cache() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--org--name");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    write(&repo.join("refs/main"), &format!("{rev}\n"));
    let snap = repo.join("snapshots").join(rev);
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        write(&snap.join(f), "{}");
    }
    let got = resolve_model_source("org/name", Some(cache.path()), true)
        .await
        .unwrap();
    assert_eq!(got, snap);

    // A missing weight file is named.
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    let err = resolve_model_source("org/name", Some(cache.path()), true)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    // Sharded weights are checked through the index.
    write(
        &snap.join("model.safetensors.index.json"),
        r#"{"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#,
    );
    write(&snap.join("model-00001-of-00002.safetensors"), "{}");
    let err = resolve_model_source("org/name", Some(cache.path()), true)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
    write(&snap.join("model-00002-of-00002.safetensors"), "{}");
    assert_eq!(
        resolve_model_source("org/name", Some(cache.path()), true)
            .await
            .unwrap(),
        snap
    );
}

#[tokio::test]
async fn offline_missing_repo_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_model_source("org/absent", Some(cache.path()), true)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("org/absent") && msg.contains("offline"),
        "{msg}"
    );
    assert!(!err.is_invalid_request());
    let err = resolve_model_source("not a repo", Some(cache.path()), true)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("org/name"), "{err}");
}

/// A Hugging Face hub on 127.0.0.1 for one repo: `GET /{repo}/resolve/{rev}/{file}` with
/// the headers hf-hub reads (`x-repo-commit`, `etag`, `content-range`) and byte ranges, one
/// request per connection. Counts the requests it answered.
struct MockHub {
    url: String,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

async fn mock_hub(repo: &'static str, files: Vec<(&'static str, Vec<u8>)>) -> MockHub {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    let files = std::sync::Arc::new(files);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let files = files.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if sock.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let head = String::from_utf8_lossy(&head).to_string();
                let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                let range = head.lines().find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("range: bytes=")
                        .map(str::to_owned)
                });
                let prefix = format!("/{repo}/resolve/main/");
                let found = path
                    .strip_prefix(&prefix)
                    .and_then(|f| files.iter().find(|(name, _)| *name == f));
                let resp = match found {
                    None => {
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            .to_vec()
                    }
                    Some((name, data)) => {
                        let len = data.len();
                        let (a, b) = range
                            .as_deref()
                            .and_then(|r| r.split_once('-'))
                            .map(|(a, b)| (a.parse().unwrap_or(0), b.parse().unwrap_or(len - 1)))
                            .unwrap_or((0, len - 1));
                        let b = b.min(len - 1);
                        let body = &data[a..=b];
                        let mut r = format!(
                            "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {a}-{b}/{len}\r\n\
                             etag: \"etag-{name}\"\r\nx-repo-commit: {COMMIT}\r\nconnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        r.extend_from_slice(body);
                        r
                    }
                };
                let _ = sock.write_all(&resp).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    MockHub { url, hits }
}

#[tokio::test]
async fn pull_downloads_a_repo_into_the_hub_cache_and_then_needs_no_network() {
    let weights: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let hub = mock_hub(
        "org/name",
        vec![
            ("config.json", br#"{"model_type":"llama"}"#.to_vec()),
            ("tokenizer.json", b"{}".to_vec()),
            ("tokenizer_config.json", b"{}".to_vec()),
            ("model.safetensors", weights.clone()),
        ],
    )
    .await;
    let cache = tempfile::tempdir().unwrap();
    let opts = flotilla_engine::Hub {
        cache_dir: Some(cache.path()),
        endpoint: Some(&hub.url),
        progress: true,
    };
    let snap = flotilla_engine::pull_model("org/name", &opts)
        .await
        .unwrap();
    // The standard layout: models--org--name/snapshots/<commit>, refs/main naming it.
    let repo = cache.path().join("models--org--name");
    assert_eq!(snap, repo.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(snap.join("tokenizer_config.json").is_file());
    // The agent finds it offline, as it would after `flotilla models pull`.
    let got = resolve_model_source("org/name", Some(cache.path()), true)
        .await
        .unwrap();
    assert_eq!(got, snap);

    // A second pull finds every required file in the cache: only the optional files it
    // never got are asked for again.
    let before = hub.hits.load(std::sync::atomic::Ordering::SeqCst);
    let again = flotilla_engine::pull_model("org/name", &opts)
        .await
        .unwrap();
    assert_eq!(again, snap);
    let asked = hub.hits.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(asked <= 3, "{asked} requests for a cached repo");

    // A repo the hub does not have, and a malformed id, are errors naming them.
    let e = flotilla_engine::pull_model("org/missing", &opts)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("org/missing"), "{e}");
    let e = flotilla_engine::pull_model("../etc", &opts)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("org/name"), "{e}");
}
