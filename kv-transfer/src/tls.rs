//! Cluster certificates and the mutual-TLS configurations every internal connection uses.
//!
//! A cluster has one CA; every node holds a certificate signed by it, valid as both TLS server
//! and client. Both ends of a KV connection present certificates and verify the peer's against
//! the CA, so a process without a cluster certificate cannot connect or accept. `tandem certs`
//! makes a development CA and node certificates with rcgen; production clusters bring their
//! own (for example from cert-manager) in the same PEM files.

use std::net::IpAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol id of tandem's KV connections.
pub const ALPN: &[u8] = b"tandem-kv/1";

/// Why certificates or TLS configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what}: {why}")]
    Pem { what: String, why: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("QUIC configuration: {0}")]
    Quic(String),
}

/// A certificate and its key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct PemPair {
    pub cert: String,
    pub key: String,
}

/// A new self-signed cluster CA.
pub fn make_ca(common_name: &str) -> Result<PemPair, TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key)?;
    Ok(PemPair { cert: cert.pem(), key: key.serialize_pem() })
}

/// A node certificate signed by `ca`, for `node` and the given host names and addresses
/// (`localhost` and `127.0.0.1` always included, so local clusters work out of the box).
pub fn make_node_cert(ca: &PemPair, node: &str, hosts: &[String]) -> Result<PemPair, TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca.cert)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut names: Vec<String> = vec![node.to_string(), "localhost".to_string()];
    names.extend(hosts.iter().filter(|h| h.parse::<IpAddr>().is_err()).cloned());
    names.dedup();
    let mut params = CertificateParams::new(names)?;
    for ip in ["127.0.0.1".to_string(), "::1".to_string()].iter().chain(hosts) {
        if let Ok(addr) = ip.parse::<IpAddr>() {
            params.subject_alt_names.push(SanType::IpAddress(addr));
        }
    }
    params.distinguished_name.push(DnType::CommonName, node);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(PemPair { cert: cert.pem(), key: key.serialize_pem() })
}

/// What a node needs for mutual TLS: the cluster CA and its own certificate and key.
#[derive(Debug)]
pub struct Identity {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let pem_err =
            |what: &str, e: rustls_pki_types::pem::Error| TlsError::Pem { what: what.into(), why: e.to_string() };
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| pem_err("CA certificate", e))?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err("node certificate", e))?;
        if chain.is_empty() {
            return Err(TlsError::Pem { what: "node certificate".into(), why: "no certificate in the PEM".into() });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| pem_err("node key", e))?;
        Ok(Self { ca, chain, key })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }

    /// Accepting side: requires and verifies a client certificate from the cluster CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// Connecting side: verifies the server against the cluster CA and presents our
    /// certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}
