//! HTTPS on the scheduler's listener (`[scheduler.tls]`): a client that trusts the
//! certificate gets answers over HTTP/2 or HTTP/1.1, plain HTTP gets nothing, and a config
//! naming a missing or mismatched file is refused with the file named.

use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_e2e::*;
use flotilla_gateway::{SchedulerSection, TlsSection};

/// A test CA and a certificate it signed for localhost and 127.0.0.1, made by openssl:
/// (certificate, key, CA certificate).
fn certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |name: &str| dir.join(name);
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (Debian: apt-get install -y openssl) makes the test certificates");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "1",
                "-subj",
                "/CN=flotilla test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        p("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
        "-out",
        "cert.pem",
    ]);
    (p("cert.pem"), p("key.pem"), p("ca.pem"))
}

#[tokio::test]
async fn the_scheduler_serves_https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = certificate(dir.path());
    let sched = start_scheduler(SchedulerSection {
        tls: TlsSection {
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
        },
        ..scheduler_section()
    })
    .await;
    let https = sched.url.replace("http://", "https://");
    let root = reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap();
    for h2 in [true, false] {
        let mut b = reqwest::Client::builder()
            .add_root_certificate(root.clone())
            .no_proxy();
        if !h2 {
            b = b.http1_only();
        }
        let resp = b
            .build()
            .unwrap()
            .get(format!("{https}/v1/models"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let want = if h2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(resp.version(), want, "ALPN picks the version");
    }
    // A client that does not trust the certificate, and one speaking plain HTTP, get in
    // nowhere; the server goes on serving.
    assert!(
        client()
            .get(format!("{https}/health"))
            .send()
            .await
            .is_err()
    );
    assert!(
        client()
            .get(format!("{}/health", sched.url))
            .send()
            .await
            .is_err()
    );
    let trusting = reqwest::Client::builder()
        .add_root_certificate(root)
        .no_proxy()
        .build()
        .unwrap();
    let resp = trusting
        .get(format!("{https}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sched.stop().await;
}

#[test]
fn a_tls_section_with_a_bad_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _, _) = certificate(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (_, other_key, _) = certificate(&other);
    let refused = |tls: TlsSection| {
        SchedulerSection {
            tls,
            ..scheduler_section()
        }
        .validate()
        .unwrap_err()
        .join("\n")
    };
    let missing = dir.path().join("missing.pem");
    let e = refused(TlsSection {
        cert_file: Some(cert.clone()),
        key_file: None,
    });
    assert!(e.contains("set both cert_file and key_file"), "{e}");
    let e = refused(TlsSection {
        cert_file: Some(cert.clone()),
        key_file: Some(missing.clone()),
    });
    assert!(
        e.contains("scheduler.tls.key_file") && e.contains("missing.pem"),
        "{e}"
    );
    let e = refused(TlsSection {
        cert_file: Some(missing),
        key_file: Some(cert.clone()),
    });
    assert!(e.contains("scheduler.tls.cert_file"), "{e}");
    let e = refused(TlsSection {
        cert_file: Some(cert),
        key_file: Some(other_key),
    });
    assert!(e.contains("does not fit the certificate"), "{e}");
}
