//! NBD over TLS (the protocol's `NBD_OPT_STARTTLS`) with rustls.
//!
//! Why STARTTLS rather than TLS from the first byte: that is what the NBD
//! protocol defines, and what nbdkit, qemu-nbd and libnbd speak; a client
//! reads the cleartext greeting, asks for TLS, and everything after it
//! (the rest of the option haggling, every request and reply) is inside
//! TLS.
//!
//! Certificates are X.509 and live in a directory laid out as nbdkit's
//! `--tls-certificates DIR` and libnbd's `tls-certificates=DIR` expect:
//! - `ca-cert.pem`: the CA that signs the peers' certificates;
//! - `server-cert.pem` and `server-key.pem`: a server's certificate chain
//!   and key;
//! - `client-cert.pem` and `client-key.pem`: a client certificate, for
//!   servers that verify clients (optional on the client side).
//!
//! A client takes everything from the device's URI (`nbds://…` or
//! `nbds+unix://…`, `tls-certificates`, `tls-hostname`,
//! `tls-verify-peer`), so the pool records per device whether TLS is
//! required and which CA to trust. The crypto provider is rustls's *ring*
//! backend (nothing to download or build beyond a C compiler).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::uri::{NbdUri, Transport};

/// File names inside a certificates directory.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
pub const SERVER_KEY_FILE: &str = "server-key.pem";
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
pub const CLIENT_KEY_FILE: &str = "client-key.pem";

/// Why TLS could not be set up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("the NBD URI {uri} asks for TLS but names no CA: add tls-certificates=DIR (a directory with {CA_CERT_FILE}), or tls-verify-peer=0 to skip checking the server")]
    NoCa { uri: String },
    #[error("the NBD URI {uri} asks for TLS type {kind:?}; only x509 certificates are supported")]
    UnsupportedType { uri: String, kind: String },
    #[error(
        "the NBD URI {uri} connects over a unix socket: add tls-hostname=NAME (the name on the server's certificate)"
    )]
    NoHostname { uri: String },
    #[error("{name:?} is not a valid TLS server name")]
    BadName { name: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read { path: path.to_path_buf(), reason: e.to_string() })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read { path: path.to_path_buf(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Read { path: path.to_path_buf(), reason: e.to_string() })
}

fn roots(dir: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(&dir.join(CA_CERT_FILE))? {
        roots.add(cert).map_err(|e| TlsError::Config(format!("{}: {e}", dir.join(CA_CERT_FILE).display())))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a client needs to connect to the device `uri` names over TLS.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

/// The TLS client setup for `uri`, or `None` for a plain (`nbd://`) URI.
pub fn client_for(uri: &NbdUri) -> Result<Option<ClientTls>, TlsError> {
    if !uri.tls_required {
        return Ok(None);
    }
    let text = uri.to_string();
    if let Some(kind) = uri.tls.tls_type.as_deref().filter(|t| *t != "x509") {
        return Err(TlsError::UnsupportedType { uri: text, kind: kind.to_string() });
    }
    let name = match (&uri.tls.tls_hostname, &uri.transport) {
        (Some(h), _) => h.clone(),
        (None, Transport::Tcp { host, .. }) => host.clone(),
        (None, Transport::Unix { .. }) => return Err(TlsError::NoHostname { uri: text }),
    };
    let server_name = ServerName::try_from(name.clone()).map_err(|_| TlsError::BadName { name })?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verify = uri.tls.tls_verify_peer.unwrap_or(true);
    let builder = match (&uri.tls.tls_certificates, verify) {
        (Some(dir), true) => builder.with_root_certificates(roots(dir)?),
        (_, false) => builder.dangerous().with_custom_certificate_verifier(Arc::new(NoServerVerification(provider()))),
        (None, true) => return Err(TlsError::NoCa { uri: text }),
    };
    let client_cert = uri
        .tls
        .tls_certificates
        .as_ref()
        .map(|d| (d.join(CLIENT_CERT_FILE), d.join(CLIENT_KEY_FILE)))
        .filter(|(c, k)| c.exists() && k.exists());
    let config = match client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(certificates(&cert)?, private_key(&key)?)
            .map_err(|e| TlsError::Config(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Some(ClientTls { config: Arc::new(config), server_name }))
}

/// A TLS server setup from a certificates directory: `server-cert.pem`,
/// `server-key.pem`, and with `verify_clients` also `ca-cert.pem`, which
/// must have signed every client's certificate.
pub fn server_from_dir(dir: &Path, verify_clients: bool) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if verify_clients {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(certificates(&dir.join(SERVER_CERT_FILE))?, private_key(&dir.join(SERVER_KEY_FILE))?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", dir.join(SERVER_CERT_FILE).display())))?;
    Ok(Arc::new(config))
}

/// `tls-verify-peer=0`: the connection is encrypted, the server unchecked
/// (signatures are still verified, so the handshake itself is sound).
#[derive(Debug)]
struct NoServerVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Writes a CA and a server (and client) certificate for `names` into
/// `dir` with `openssl`, in the layout above: for tests and the demo.
#[doc(hidden)]
pub fn make_test_certificates(dir: &Path, names: &[&str]) -> std::io::Result<()> {
    use std::process::Command;
    std::fs::create_dir_all(dir)?;
    let run = |args: &[&str]| -> std::io::Result<()> {
        let out = Command::new("openssl").args(args).current_dir(dir).output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        "/CN=sanvol test CA",
        "-keyout",
        "ca-key.pem",
        "-out",
        CA_CERT_FILE,
    ])?;
    let sans: Vec<String> = names
        .iter()
        .map(|n| if n.parse::<std::net::IpAddr>().is_ok() { format!("IP:{n}") } else { format!("DNS:{n}") })
        .collect();
    let ext = format!("subjectAltName={}", sans.join(","));
    for (who, cert, key, usage) in [
        ("server", SERVER_CERT_FILE, SERVER_KEY_FILE, "extendedKeyUsage=serverAuth"),
        ("client", CLIENT_CERT_FILE, CLIENT_KEY_FILE, "extendedKeyUsage=clientAuth"),
    ] {
        let csr = format!("{who}.csr");
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={}", names.first().copied().unwrap_or(who)),
            "-keyout",
            key,
            "-out",
            &csr,
        ])?;
        let extfile = format!("{who}.ext");
        std::fs::write(dir.join(&extfile), format!("{ext}\n{usage}\n"))?;
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            CA_CERT_FILE,
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "3650",
            "-out",
            cert,
            "-extfile",
            &extfile,
        ])?;
    }
    Ok(())
}
