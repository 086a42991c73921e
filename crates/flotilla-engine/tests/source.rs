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
