//! The socket behind a WebSocket: a client's TCP stream, a [`Sealed`] stream (TLS, which the
//! server implements; the engine never links a TLS library), or one end of a local socket
//! pair (tests and fuzzing). Readers and shards use it only through non-blocking `try_*`
//! calls and readiness. Nothing here buffers; a sealed stream may hold the output of one
//! write (see [`Sealed`]).

use std::fmt;
use std::io::{self, IoSlice, Read};
use std::net::Shutdown;
use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// A connection whose bytes are transformed on the way (TLS), seen as plain bytes, on one
/// socket and with no task of its own: the reader decrypts in its `try_read`, the shard
/// encrypts in its `try_write_vectored`.
///
/// The contract, beyond that of the `try_*` calls of a socket:
/// - `try_write_vectored` takes plain bytes only when the output of every earlier write has
///   reached the kernel; otherwise it tries to send that output and, if some is left, fails
///   with `WouldBlock` without taking anything. So at most one write's output waits here.
/// - After a write, output may still wait ([`Sealed::try_flush`] says so); the shard keeps
///   waiting for writability and calling `try_flush` until it is sent, as if its own queue
///   were not empty.
/// - `poll_read_ready` is ready when `try_read` may return bytes: the socket is readable or
///   plain bytes decrypted earlier are still waiting.
pub trait Sealed: Send + Sync + fmt::Debug {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Sends output still waiting from earlier writes; `Ok(true)` once none is left,
    /// `Ok(false)` if the socket would block first.
    fn try_flush(&self) -> io::Result<bool>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// As [`Socket::shutdown`]; a `Write` shutdown first says so in the transformed stream
    /// (a TLS `close_notify`) when the socket takes it at once.
    fn shutdown(&self, how: Shutdown);
}

#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    /// A TLS connection (the server's `tls.rs`): one socket, encrypted in place.
    Sealed(Box<dyn Sealed>),
    /// One end of a local socket pair: tests and fuzzing drive a connection through it.
    Local(UnixStream),
}

impl Socket {
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Tcp(s) => s.poll_read_ready(cx),
            Self::Sealed(s) => s.poll_read_ready(cx),
            Self::Local(s) => s.poll_read_ready(cx),
        }
    }

    /// Reads what the kernel holds, without waiting. On TCP, a read that returns fewer bytes
    /// than `buf` holds has emptied the receive queue, so it also clears the socket's read
    /// readiness (through `try_io`, whose tick check keeps an edge that arrived meanwhile):
    /// the reader then waits for the next edge instead of making one more read that can
    /// only fail with `WouldBlock`, which halves the reads of a client that sends one
    /// message at a time. End of file is never cleared: tokio keeps it in the readiness.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => {
                let mut short = None;
                let result = s.try_io(Interest::READABLE, || {
                    let n = (&*socket2::SockRef::from(s)).read(&mut *buf)?;
                    if n > 0 && n < buf.len() {
                        short = Some(n);
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(n)
                });
                match short {
                    Some(n) => Ok(n),
                    None => result,
                }
            }
            Self::Sealed(s) => s.try_read(buf),
            Self::Local(s) => s.try_read(buf),
        }
    }

    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_write(buf),
            Self::Sealed(s) => s.try_write_vectored(&[IoSlice::new(buf)]),
            Self::Local(s) => s.try_write(buf),
        }
    }

    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_write_vectored(bufs),
            Self::Sealed(s) => s.try_write_vectored(bufs),
            Self::Local(s) => s.try_write_vectored(bufs),
        }
    }

    /// Sends what a [`Sealed`] stream still holds of earlier writes; `Ok(true)` once nothing
    /// is left (always, for the others, which hold nothing).
    pub fn try_flush(&self) -> io::Result<bool> {
        match self {
            Self::Sealed(s) => s.try_flush(),
            Self::Tcp(_) | Self::Local(_) => Ok(true),
        }
    }

    pub(crate) async fn writable(&self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.writable().await,
            Self::Sealed(s) => std::future::poll_fn(|cx| s.poll_write_ready(cx)).await,
            Self::Local(s) => s.writable().await,
        }
    }

    /// Shuts `how` down: `Write` sends end-of-file after the queued bytes, `Both` also wakes
    /// the reader with end-of-file. Errors mean the peer is already gone, which is the goal.
    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Self::Tcp(s) => socket2::SockRef::from(s).shutdown(how),
            Self::Sealed(s) => {
                s.shutdown(how);
                Ok(())
            }
            Self::Local(s) => socket2::SockRef::from(s).shutdown(how),
        };
    }
}
