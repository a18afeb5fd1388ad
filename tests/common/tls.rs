//! TLS for the tests: certificates made with the `openssl` CLI (a test CA and server
//! certificates it signs, as a deployment would have), a rustls client that trusts that CA, and
//! WSS/HTTPS on top of it ([`Client::connect_tls_to`], [`https_get`]).
//!
//! It does not start relays (see `relay`: start one with `TLS_CERT_FILE`/`TLS_KEY_FILE`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::MaybeTlsStream;

use super::client::{Client, ConnectError};
use super::http::{exchange_on, get_request, HttpResponse};
use super::relay::Endpoint;
use super::{EVENT_TIMEOUT, HTTP_TIMEOUT};

/// The name every test server certificate is issued for (and the client asks for).
pub const TLS_SERVER_NAME: &str = "localhost";

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (test.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test certificate authority in `dir`: `ca.pem` and its key.
#[derive(Debug)]
pub struct TestCa {
    dir: PathBuf,
    pub cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path) -> TestCa {
        let cert = dir.join("ca.pem");
        let key = dir.join("ca.key");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key.to_str().expect("utf-8 path"),
            "-out",
            cert.to_str().expect("utf-8 path"),
            "-days",
            "2",
            "-subj",
            "/CN=roomcast test CA",
        ]);
        TestCa {
            dir: dir.to_path_buf(),
            cert,
            key,
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1 signed by this CA, as
    /// `{name}.pem` and `{name}.key` (a fresh key each time, so each has its own identity).
    pub fn issue(&self, name: &str) -> ServerCert {
        let cert = self.dir.join(format!("{name}.pem"));
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write extensions");
        let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &path(&key),
            "-out",
            &path(&csr),
            "-subj",
            &format!("/CN=localhost ({name})"),
        ]);
        let serial = format!(
            "{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &path(&csr),
            "-CA",
            &path(&self.cert),
            "-CAkey",
            &path(&self.key),
            "-set_serial",
            &serial,
            "-days",
            "2",
            "-extfile",
            &path(&ext),
            "-out",
            &path(&cert),
        ]);
        ServerCert { cert, key }
    }

    /// A rustls client configuration that trusts this CA only.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(pem_certificate(&self.cert))
            .expect("the test CA is a valid trust anchor");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

/// A server certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServerCert {
    /// The certificate, as DER (to compare with what a server presented).
    pub fn der(&self) -> CertificateDer<'static> {
        pem_certificate(&self.cert)
    }

    /// Put this certificate and key where `target` keeps its files (as a renewal does).
    pub fn install_as(&self, target: &ServerCert) {
        std::fs::copy(&self.cert, &target.cert).expect("copy certificate");
        std::fs::copy(&self.key, &target.key).expect("copy key");
    }
}

/// The first certificate of a PEM file.
pub fn pem_certificate(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path)
        .unwrap_or_else(|e| panic!("{} holds no certificate: {e}", path.display()))
}

/// TCP connect and TLS handshake as `localhost`, within [`EVENT_TIMEOUT`].
pub async fn tls_connect(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let name = ServerName::try_from(TLS_SERVER_NAME).expect("a valid DNS name");
    let attempt = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        connector.connect(name, tcp).await
    };
    tokio::time::timeout(EVENT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            ))
        })
}

/// The certificate a full handshake with `endpoint` is given (`config` without session
/// resumption: a resumed session shows the certificate of the session it resumes).
pub async fn presented_certificate(
    endpoint: &impl Endpoint,
    config: &Arc<rustls::ClientConfig>,
) -> CertificateDer<'static> {
    let mut fresh = (**config).clone();
    fresh.resumption = rustls::client::Resumption::disabled();
    let stream = tls_connect(endpoint.socket_addr(), &Arc::new(fresh))
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with {} failed: {e}", endpoint.socket_addr()));
    let (_, session) = stream.get_ref();
    session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presented a certificate")
        .clone()
        .into_owned()
}

/// `GET path` over HTTPS with `Connection: close` and extra headers.
pub async fn try_https_get(
    endpoint: &impl Endpoint,
    config: &Arc<rustls::ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    let addr = endpoint.socket_addr();
    let exchange = async {
        let stream = tls_connect(addr, config).await?;
        exchange_on(stream, &get_request(addr, path, headers)).await
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("HTTPS GET {path} timed out"),
            ))
        })
}

/// [`try_https_get`]; panics if the exchange fails (any status is returned).
pub async fn https_get(
    endpoint: &impl Endpoint,
    config: &Arc<rustls::ClientConfig>,
    path: &str,
) -> HttpResponse {
    try_https_get(endpoint, config, path, &[])
        .await
        .unwrap_or_else(|e| {
            panic!(
                "HTTPS GET {path} from {} failed: {e}",
                endpoint.socket_addr()
            )
        })
}

impl Client {
    /// Upgrade to `wss://localhost:PORT{path_and_query}` over a TLS handshake with `config`,
    /// with the given Origin (None: no Origin header).
    pub async fn connect_tls_to(
        endpoint: &impl Endpoint,
        config: &Arc<rustls::ClientConfig>,
        path_and_query: &str,
        origin: Option<&str>,
    ) -> Result<Client, ConnectError> {
        let addr = endpoint.socket_addr();
        let url = format!("wss://{TLS_SERVER_NAME}:{}{path_and_query}", addr.port());
        let mut request = url
            .into_client_request()
            .map_err(|e| ConnectError::Other(e.to_string()))?;
        if let Some(origin) = origin {
            request.headers_mut().insert(
                "Origin",
                HeaderValue::from_str(origin).map_err(|e| ConnectError::Other(e.to_string()))?,
            );
        }
        let stream = tls_connect(addr, config)
            .await
            .map_err(|e| ConnectError::Other(format!("TLS: {e}")))?;
        let upgrade = tokio_tungstenite::client_async(request, MaybeTlsStream::Rustls(stream));
        match tokio::time::timeout(EVENT_TIMEOUT, upgrade).await {
            Err(_) => Err(ConnectError::Other("upgrade timed out".into())),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                Err(ConnectError::Status(response.status().as_u16()))
            }
            Ok(Err(e)) => Err(ConnectError::Other(e.to_string())),
            Ok(Ok((ws, _response))) => Ok(Client::from_ws(ws, "", "")),
        }
    }
}
