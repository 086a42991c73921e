//! API keys against real SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use common::TestDb;
use flotilla_api::ErrorKind;
use flotilla_state::{NewKey, StateError, hash_secret};
use sqlx::{Connection, Row};

on_both!(
    keys_are_created_found_listed_and_revoked,
    bad_keys_are_invalid_input
);

fn new_key(name: &str) -> NewKey {
    NewKey {
        name: name.into(),
        budget_usd: None,
        rpm: None,
        tpm: None,
        admin: false,
    }
}

async fn keys_are_created_found_listed_and_revoked(db: TestDb) {
    let ledger = &db.ledger;
    let (alice, secret) = ledger
        .create_key(&NewKey {
            budget_usd: Some(10.0),
            rpm: Some(60),
            tpm: Some(100_000),
            ..new_key("alice")
        })
        .await
        .expect("create alice");
    assert!(secret.starts_with("fl-") && secret.len() == 43, "{secret}");
    assert_eq!(alice.prefix, secret[3..11]);
    assert!(
        alice.id.starts_with("key_") && alice.id.len() == 16,
        "{}",
        alice.id
    );
    assert_eq!(
        (alice.budget_usd, alice.spent_usd, alice.rpm, alice.tpm),
        (Some(10.0), 0.0, Some(60), Some(100_000))
    );
    assert!(!alice.admin && !alice.revoked);

    assert_eq!(
        ledger.key_by_secret(&secret).await.expect("lookup"),
        Some(alice.clone())
    );
    // The same secret with its last character changed.
    let last = if secret.ends_with('x') { 'y' } else { 'x' };
    let wrong = format!("{}{last}", &secret[..42]);
    assert_ne!(wrong, secret);
    assert_eq!(ledger.key_by_secret(&wrong).await.expect("lookup"), None);
    assert_eq!(ledger.key_by_secret("").await.expect("lookup"), None);

    // Listed oldest first.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (bob, bob_secret) = ledger
        .create_key(&NewKey {
            admin: true,
            ..new_key("bob")
        })
        .await
        .expect("create bob");
    assert_ne!(bob_secret, secret);
    assert!(bob.admin && bob.budget_usd.is_none() && bob.rpm.is_none());
    assert_eq!(
        ledger.keys().await.expect("keys"),
        [alice.clone(), bob.clone()]
    );

    let err = ledger
        .create_key(&new_key("alice"))
        .await
        .expect_err("duplicate");
    assert!(
        matches!(err, StateError::InvalidInput(ref m) if m.contains("alice") && m.contains("exists")),
        "{err:?}"
    );

    // Revoke by name, then by id; revoked keys are still found, marked.
    assert!(ledger.revoke_key("alice").await.expect("revoke"));
    let found = ledger
        .key_by_secret(&secret)
        .await
        .expect("lookup")
        .expect("still there");
    assert!(found.revoked);
    assert_eq!(found.id, alice.id);
    assert!(ledger.revoke_key(&bob.id).await.expect("revoke"));
    assert!(ledger.revoke_key("alice").await.expect("revoke again"));
    assert!(!ledger.revoke_key("nobody").await.expect("revoke unknown"));
    assert!(ledger.keys().await.expect("keys").iter().all(|k| k.revoked));

    // Only the hash is stored.
    let mut raw = db.raw().await;
    let rows = sqlx::query("SELECT id, name, prefix, secret_sha256 FROM api_keys")
        .fetch_all(&mut raw)
        .await
        .expect("raw keys");
    assert_eq!(rows.len(), 2);
    let mut hashes = Vec::new();
    for row in &rows {
        for col in ["id", "name", "prefix", "secret_sha256"] {
            let v: String = row.try_get(col).expect("text column");
            for s in [&secret, &bob_secret] {
                assert!(!v.contains(&s[3..]), "{col} holds a secret");
            }
        }
        hashes.push(row.try_get::<String, _>("secret_sha256").expect("hash"));
    }
    hashes.sort();
    let mut want = vec![hash_secret(&secret), hash_secret(&bob_secret)];
    want.sort();
    assert_eq!(hashes, want);
    raw.close().await.expect("close raw");
}

async fn bad_keys_are_invalid_input(db: TestDb) {
    let ledger = &db.ledger;
    let cases = [
        new_key(""),
        new_key("   "),
        new_key("key_0123456789ab"),
        NewKey {
            budget_usd: Some(-1.0),
            ..new_key("neg")
        },
        NewKey {
            budget_usd: Some(f64::NAN),
            ..new_key("nan")
        },
        NewKey {
            budget_usd: Some(f64::INFINITY),
            ..new_key("inf")
        },
        NewKey {
            tpm: Some(u64::MAX),
            ..new_key("huge")
        },
    ];
    for k in cases {
        let err = ledger.create_key(&k).await.expect_err("invalid");
        assert!(matches!(err, StateError::InvalidInput(_)), "{k:?}: {err:?}");
        assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    }
    assert!(ledger.keys().await.expect("keys").is_empty());
    // The largest storable limits round-trip.
    let (k, secret) = ledger
        .create_key(&NewKey {
            rpm: Some(u32::MAX),
            tpm: Some(i64::MAX as u64),
            budget_usd: Some(0.0),
            ..new_key("max")
        })
        .await
        .expect("create");
    assert_eq!(
        ledger.key_by_secret(&secret).await.expect("lookup"),
        Some(k)
    );
}
