//! CLI commands that need no model.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tandem");

#[test]
fn certs_makes_a_ca_and_node_certificates_that_verify() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["certs", "--out"])
        .arg(dir.path())
        .args(["--nodes", "prefill-0,decode-0", "--hosts", "10.0.0.5,node.example"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
    for n in ["prefill-0", "decode-0"] {
        // Each node's files load as a mutual-TLS identity under the CA.
        let id = tandem_kv_transfer::tls::Identity::from_pem(
            &read("ca.pem"),
            &read(&format!("{n}.pem")),
            &read(&format!("{n}.key")),
        )
        .unwrap();
        id.server_config().unwrap();
        id.client_config().unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(format!("{n}.key"))).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "private keys must not be readable by others");
    }
    // A second run reuses the CA.
    let ca_before = read("ca.pem");
    let out = Command::new(BIN).args(["certs", "--out"]).arg(dir.path()).args(["--nodes", "router"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(read("ca.pem"), ca_before);
    // Bad names are refused.
    let out = Command::new(BIN).args(["certs", "--out"]).arg(dir.path()).args(["--nodes", "../evil"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("../evil"));
}
