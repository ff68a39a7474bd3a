//! The socket behind a WebSocket: a client's TCP stream, or the local end of a TLS pump
//! (the server's `tls.rs`). Readers and shards use it only through non-blocking `try_*` calls and
//! readiness; nothing here buffers.

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::task::{Context, Poll};

use tokio::net::{TcpStream, UnixStream};

#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    /// Plain bytes of a TLS connection; the pump task encrypts them.
    Local(UnixStream),
}

impl Socket {
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Tcp(s) => s.poll_read_ready(cx),
            Self::Local(s) => s.poll_read_ready(cx),
        }
    }

    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_read(buf),
            Self::Local(s) => s.try_read(buf),
        }
    }

    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_write(buf),
            Self::Local(s) => s.try_write(buf),
        }
    }

    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_write_vectored(bufs),
            Self::Local(s) => s.try_write_vectored(bufs),
        }
    }

    pub(crate) async fn writable(&self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.writable().await,
            Self::Local(s) => s.writable().await,
        }
    }

    /// Shuts `how` down: `Write` sends end-of-file after the queued bytes, `Both` also wakes
    /// the reader with end-of-file. Errors mean the peer is already gone, which is the goal.
    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Self::Tcp(s) => socket2::SockRef::from(s).shutdown(how),
            Self::Local(s) => socket2::SockRef::from(s).shutdown(how),
        };
    }
}
