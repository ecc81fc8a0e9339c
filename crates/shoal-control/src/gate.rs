//! The coordinator's door: connections are accepted by a task of their own, each must
//! send its first bytes (HTTP/2's preface, or a TLS hello) within [`FIRST_BYTES`] or is
//! dropped, and at most the job's members plus [`MAX_STRANGERS`] are open at once (more
//! wait in the kernel's backlog until a place frees), so strangers that connect and
//! say nothing neither delay nor exhaust the port.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a new connection has to send its first bytes.
pub const FIRST_BYTES: Duration = Duration::from_secs(3);

/// Connections beyond the members' own that the port holds at once.
pub const MAX_STRANGERS: usize = 256;

/// An accepted connection that has spoken; it holds its place until it closes.
pub(crate) struct Conn {
    s: TcpStream,
    _place: OwnedSemaphorePermit,
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.s).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.s).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.s).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.s).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.s).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.s.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = <TcpStream as tonic::transport::server::Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.s.connect_info()
    }
}

/// The connections of `listener` that have spoken, for a job of `members` processes
/// (call from within the runtime: it spawns the accepting task).
pub(crate) fn incoming(
    listener: TcpListener,
    members: usize,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let places = Arc::new(Semaphore::new(members + MAX_STRANGERS));
    tokio::spawn(async move {
        loop {
            let Ok(place) = places.clone().acquire_owned().await else {
                return;
            };
            let (s, from) = match listener.accept().await {
                Ok(a) => a,
                Err(_) => {
                    // Out of descriptors or an aborted handshake: try again shortly.
                    drop(place);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let to_server = tx.clone();
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut b = [0u8; 1];
                match tokio::time::timeout(FIRST_BYTES, s.peek(&mut b)).await {
                    Ok(Ok(n)) if n > 0 => {
                        let _ = to_server.send(Ok(Conn { s, _place: place })).await;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        eprintln!(
                            "coordinator: dropped a connection from {from} that sent nothing \
                             within {FIRST_BYTES:?}"
                        );
                    }
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
