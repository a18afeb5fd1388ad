//! Direct TLS (`TLS_CERT_FILE` + `TLS_KEY_FILE`): the certificate, its reload, the rustls
//! configuration, and the sans-IO [`Session`] a WebSocket drives after the upgrade.
//!
//! The HTTP stage is served through tokio-rustls (`Tls::acceptor`). After an upgrade, http.rs
//! takes the bare `TcpStream` and the `rustls::ServerConnection` back out of the tokio-rustls
//! stream, and the connection task drives that `ServerConnection` from its own readiness loop:
//! `Session::read_from` reads TLS records off the socket and decrypts them, `take_plaintext`
//! copies the plaintext into the worker thread's read buffer, `encrypt` takes frames and
//! `write_to` writes records. So a TLS connection keeps the relay's shape (one task, no stored
//! futures, frames parsed from the per-thread buffer); what it adds per connection is the boxed
//! `Session` (ARCHITECTURE.md has its measured cost and what rustls keeps allocated in it).
//!
//! The certificate is served by a resolver that holds the current `CertifiedKey` behind a lock:
//! `Tls::reload` (SIGHUP) reads both files again and swaps it, so new handshakes get the new
//! certificate while open connections keep the session they have. A reload that fails leaves
//! the old certificate in place.
//!
//! This module does not decide when to reload (main.rs does, on SIGHUP), count anything (the
//! caller does, through `metrics`), or know WebSocket frames.

use std::io::{self, IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::socket::Socket;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, ServerConnection};

/// Bytes of encrypted records rustls may hold for one connection before `encrypt` takes no more
/// (`ServerConnection::set_buffer_limit`). Frames it has not taken stay in the connection's
/// pending write, charged to its outbox, so a slow TLS reader still reaches OUTBOX_MAX_BYTES
/// (1013) and WRITE_STALL_MS like a plain one. One full record and its overhead.
pub const TLS_BUFFER_BYTES: usize = 16 * 1024 + 256;

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {path} is not valid PEM: {detail}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("TLS_CERT_FILE {0} holds no CERTIFICATE block")]
    NoCertificate(PathBuf),
    #[error("TLS_KEY_FILE {0} holds no private key (PKCS#8, PKCS#1 or SEC1 PEM)")]
    NoKey(PathBuf),
    #[error("the certificate and key cannot be used together: {0}")]
    Unusable(rustls::Error),
}

/// The TLS configuration of a listener and the files its certificate comes from.
pub struct Tls {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    certificate: Arc<CurrentCertificate>,
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Read and check both files (a start-up error says which file and why).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = load_certified_key(cert_path, key_path, &provider)?;
        let certificate = Arc::new(CurrentCertificate {
            key: RwLock::new(Arc::new(key)),
        });
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Unusable)?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        // Only HTTP/1.1 is spoken: a browser offering h2 and http/1.1 is told to use the latter.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            provider,
            certificate,
            config: Arc::new(config),
        })
    }

    /// Read both files again and serve the new certificate to every handshake from now on.
    /// On error the certificate served so far stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_certified_key(&self.cert_path, &self.key_path, &self.provider)?;
        *self
            .certificate
            .key
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
        Ok(())
    }

    /// The acceptor for the HTTP stage.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The rustls configuration every handshake uses (for tools and tests that measure it).
    pub fn server_config(&self) -> &Arc<ServerConfig> {
        &self.config
    }
}

/// The certificate handshakes get; swapped whole by a reload.
#[derive(Debug)]
struct CurrentCertificate {
    key: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let pem_error =
        |what: &'static str, path: &Path, e: rustls::pki_types::pem::Error| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            detail: e.to_string(),
        };
    let cert_pem = read_file("TLS_CERT_FILE", cert_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error("TLS_CERT_FILE", cert_path, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert_path.to_path_buf()));
    }
    let key_pem = read_file("TLS_KEY_FILE", key_path)?;
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey(key_path.to_path_buf()))
        }
        Err(e) => return Err(pem_error("TLS_KEY_FILE", key_path, e)),
    };
    // Parses the key with the provider and checks it belongs to the first certificate.
    CertifiedKey::from_der(chain, key, provider).map_err(TlsError::Unusable)
}

/// One WebSocket's TLS session after the upgrade, driven sans-IO from the connection's loop.
/// Boxed in the connection, so plain connections pay one `None` for it.
pub struct Session {
    conn: ServerConnection,
}

/// What a read of the socket gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Records were read and decrypted (there may be plaintext, or only handshake or alerts).
    Records,
    /// The peer closed the TCP connection.
    Eof,
}

impl Session {
    pub fn new(mut conn: ServerConnection) -> Box<Session> {
        conn.set_buffer_limit(Some(TLS_BUFFER_BYTES));
        Box::new(Session { conn })
    }

    /// Read what the socket has (rustls reads at most 4 KiB per call) and decrypt it.
    /// `WouldBlock` when the socket had nothing (the caller clears its readiness), any
    /// other error for a broken socket or a TLS protocol error (rustls' alert is sent first, if
    /// the socket takes it).
    pub fn read_from(&mut self, mut socket: Socket<'_>) -> io::Result<Received> {
        let n = self.conn.read_tls(&mut socket)?;
        if n == 0 {
            return Ok(Received::Eof);
        }
        if let Err(e) = self.conn.process_new_packets() {
            let _ = self.conn.write_tls(&mut socket);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        Ok(Received::Records)
    }

    /// Copy decrypted bytes into `buf`. `Ok(0)`: the peer ended the TLS session (close_notify);
    /// `WouldBlock`: nothing decrypted is waiting.
    pub fn take_plaintext(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn.reader().read(buf)
    }

    /// Encrypt from the front of `frames` as much as rustls' bounded buffer takes; returns how
    /// many plaintext bytes it took.
    pub fn encrypt(&mut self, frames: &[IoSlice<'_>]) -> io::Result<usize> {
        self.conn.writer().write_vectored(frames)
    }

    /// Encrypted bytes wait to be written.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Write encrypted records to the socket (one vectored system call).
    pub fn write_to(&mut self, mut socket: Socket<'_>) -> io::Result<usize> {
        self.conn.write_tls(&mut socket)
    }

    /// Queue the close_notify alert (written by `write_to`).
    pub fn send_close_notify(&mut self) {
        self.conn.send_close_notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_invalid_files_are_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("roomcast-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let err = Tls::load(&cert, &key).expect_err("no files");
        assert!(
            matches!(
                err,
                TlsError::Read {
                    what: "TLS_CERT_FILE",
                    ..
                }
            ),
            "{err}"
        );
        std::fs::write(&cert, "not a certificate\n").expect("write");
        std::fs::write(&key, "not a key\n").expect("write");
        let err = Tls::load(&cert, &key).expect_err("no PEM blocks");
        assert!(matches!(err, TlsError::NoCertificate(_)), "{err}");
        assert!(err.to_string().contains("cert.pem"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
