//! `wss://` targets: a rustls client session driven over a worker's non-blocking socket, for
//! staging runs through a real load balancer that terminates TLS (`--i-own-the-target`).
//!
//! [`Io`] reads and writes either the bare socket or, through the session, TLS records on it,
//! with the same non-blocking contract as `TcpStream::try_read`/`try_write` (`WouldBlock` when
//! the socket has nothing or takes nothing). The session buffers the records the socket did not
//! take; [`Io::wants_write`] says so, and [`Io::flush`] writes them once the socket is writable.
//! Each TLS connection costs its session's buffers (tens of KiB), which a loopback run of
//! 100,000 connections would not want, so plain `ws://` stays the default.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection};
use tokio::net::TcpStream;

/// A client configuration trusting the system's roots and `ca_file`'s certificates (PEM).
pub fn client_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = ca_file {
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading --ca-file {}", path.display()))?
        {
            let cert = cert.with_context(|| format!("parsing --ca-file {}", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("adding --ca-file {}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(anyhow!(
            "no trusted root certificates for wss://: install ca-certificates or pass --ca-file"
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// A new session for `host` (the name in the certificate, or an IP address).
pub fn session(config: &Arc<ClientConfig>, host: &str) -> Result<ClientConnection, String> {
    let name = ServerName::try_from(host.to_owned()).map_err(|_| "tls_bad_server_name")?;
    ClientConnection::new(config.clone(), name).map_err(|e| format!("tls_{e}"))
}

/// The bare socket as `std::io` Read/Write, non-blocking.
struct Socket<'a>(&'a TcpStream);

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One connection's byte stream: the socket, through a TLS session when there is one.
pub struct Io<'a> {
    pub stream: &'a TcpStream,
    pub tls: Option<&'a mut ClientConnection>,
}

impl Io<'_> {
    /// Like `TcpStream::try_read`: Ok(0) at the end of the stream.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return self.stream.try_read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match tls.read_tls(&mut Socket(self.stream)) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    tls.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    // Handshake messages and alerts the records asked for.
                    flush_records(self.stream, tls)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Like `TcpStream::try_write`. Through TLS, bytes taken may still wait in the session
    /// (see [`Io::wants_write`]); nothing new is taken while earlier records wait.
    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return self.stream.try_write(buf);
        };
        flush_records(self.stream, tls)?;
        if tls.wants_write() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = tls.writer().write(buf)?;
        flush_records(self.stream, tls)?;
        Ok(n)
    }

    /// TLS records wait for the socket to become writable.
    pub fn wants_write(&self) -> bool {
        self.tls.as_deref().is_some_and(|t| t.wants_write())
    }

    /// Write the TLS records waiting in the session, as far as the socket takes them.
    pub fn flush(&mut self) -> io::Result<()> {
        match self.tls.as_deref_mut() {
            Some(tls) => flush_records(self.stream, tls),
            None => Ok(()),
        }
    }

    /// Write all of `buf`, waiting for the socket as needed (the handshake's first steps).
    pub async fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() || self.wants_write() {
            if buf.is_empty() {
                self.flush()?;
            } else {
                match self.try_write(buf) {
                    Ok(n) => buf = &buf[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if !buf.is_empty() || self.wants_write() {
                self.stream.writable().await?;
            }
        }
        Ok(())
    }

    /// Read at least one byte (Ok(0): end of stream), waiting for the socket as needed.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.wants_write() {
                self.flush()?;
            }
            match self.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            if self.wants_write() {
                self.stream.writable().await?;
            } else {
                self.stream.readable().await?;
            }
        }
    }
}

fn flush_records(stream: &TcpStream, tls: &mut ClientConnection) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(&mut Socket(stream)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
