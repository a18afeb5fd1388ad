//! A connection's socket, borrowed for one non-blocking read or write, whoever drives it: the
//! connection's reactor (a bare `std` socket in its epoll set, reactor.rs) or, while it closes,
//! a tokio task (a `tokio` socket, whose readiness a `WouldBlock` must clear).

use std::io::{self, IoSlice, Read, Write};

#[derive(Clone, Copy)]
pub enum Socket<'a> {
    Bare(&'a std::net::TcpStream),
    Tokio(&'a tokio::net::TcpStream),
}

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Bare(s) => (&**s).read(buf),
            Socket::Tokio(s) => s.try_read(buf),
        }
    }
}

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Bare(s) => (&**s).write(buf),
            Socket::Tokio(s) => s.try_write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Bare(s) => (&**s).write_vectored(bufs),
            Socket::Tokio(s) => s.try_write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
