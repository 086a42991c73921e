use flotilla_engine::make_test_model;

#[test]
fn make_test_model_is_byte_identical_across_runs() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    make_test_model(a.path()).unwrap();
    make_test_model(b.path()).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let x = std::fs::read(a.path().join(file)).unwrap();
        let y = std::fs::read(b.path().join(file)).unwrap();
        assert!(!x.is_empty(), "{file} is empty");
        assert!(x == y, "{file} differs between two runs");
    }
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.path().join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["bos_token"], "<s>");
    assert_eq!(tc["eos_token"], "</s>");
    assert!(
        tc["chat_template"]
            .as_str()
            .unwrap()
            .contains("add_generation_prompt")
    );
}
