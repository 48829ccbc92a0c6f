//! Yamux as the connection's stream multiplexer, with frames sized to Noise's.
//!
//! Wire-compatible with `libp2p-yamux` (same `/yamux/1.0.0` protocol, same `yamux` crate); we
//! adapt the crate to libp2p ourselves to choose the frame size, which `libp2p-yamux` does not
//! expose, and to coalesce flushes. The `yamux` connection flushes after every frame it sends,
//! and Noise turns each flush into an encrypted message and a `write` to the socket: with
//! yamux's default 16 KiB frames, a 1 GiB blob costs 65,536 short Noise messages and as many
//! socket writes and wake-ups of the reader. Our frames carry four full Noise messages
//! (256 KiB, yamux's initial stream window), so every message is full and yamux handles a
//! quarter as many frames as with one message per frame; [`DeferFlush`] then lets Noise write
//! two messages at a time. Measured steps (docs/benchmarks.md): one full message per frame
//! took a quarter off the CPU a bare libp2p stream spends per byte, deferred flushes halved
//! the socket writes again, and four messages per frame took another tenth off a FedAvg
//! round's CPU.
//!
//! The same frames suit TLS (see [`super::secure`]): rustls cuts what it is given into
//! records of at most 16 KiB of plaintext and writes them at once (a flush changes nothing),
//! so a frame is sixteen records, fifteen full and one of 16,304 bytes, plus a small record for
//! yamux's 12-byte header, which is written apart. (The muxer cannot tell the two protocols
//! apart anyway: multistream-select's `Negotiated` hides the connection beneath it.)

use std::collections::VecDeque;
use std::io;
use std::iter;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures::future;
use futures::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};

/// Largest payload of one Noise transport message: 65,535 bytes less the 16-byte tag.
const NOISE_MAX_PAYLOAD: usize = 65_535 - 16;

/// Bytes of a yamux frame header.
const YAMUX_HEADER: usize = 12;

/// Payload bytes per yamux data frame: header and payload fill four Noise messages exactly,
/// and the frame fits yamux's initial stream window (256 KiB).
pub const FRAME_PAYLOAD: usize = 4 * NOISE_MAX_PAYLOAD - YAMUX_HEADER;

/// Inbound streams held for the swarm between its polls; a peer that opens more without them
/// being taken has the extra ones reset. Matches yamux's own backlog of unacknowledged streams,
/// which a well-behaved peer never exceeds.
const MAX_WAITING_INBOUND: usize = 256;

/// The upgrade that turns an authenticated connection into a yamux session.
#[derive(Debug, Clone)]
pub struct Yamux(yamux::Config);

impl Default for Yamux {
    fn default() -> Self {
        let mut cfg = yamux::Config::default();
        cfg.set_split_send_size(FRAME_PAYLOAD);
        Self(cfg)
    }
}

impl Yamux {
    /// A session on `io`; yamux needs no handshake, so the upgrade is ready at once.
    fn session<C: AsyncRead + AsyncWrite + Unpin>(
        self,
        io: C,
        mode: yamux::Mode,
    ) -> future::Ready<Result<Muxer<C>, io::Error>> {
        future::ready(Ok(Muxer::new(yamux::Connection::new(
            DeferFlush::new(io),
            self.0,
            mode,
        ))))
    }
}

impl UpgradeInfo for Yamux {
    type Info = &'static str;
    type InfoIter = iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        iter::once("/yamux/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for Yamux
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Muxer<C>, io::Error>>;

    fn upgrade_inbound(self, io: C, _: Self::Info) -> Self::Future {
        self.session(io, yamux::Mode::Server)
    }
}

impl<C> OutboundConnectionUpgrade<C> for Yamux
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Muxer<C>, io::Error>>;

    fn upgrade_outbound(self, io: C, _: Self::Info) -> Self::Future {
        self.session(io, yamux::Mode::Client)
    }
}

/// One yamux session as libp2p's [`StreamMuxer`].
///
/// yamux makes progress only while its inbound side is polled, and libp2p polls a connection
/// through [`StreamMuxer::poll`] whether or not it wants new streams just then: streams that
/// arrive during such a poll wait here until [`StreamMuxer::poll_inbound`] takes them.
pub struct Muxer<C> {
    conn: yamux::Connection<DeferFlush<C>>,
    waiting: VecDeque<yamux::Stream>,
    inbound_waker: Option<Waker>,
}

impl<C: AsyncRead + AsyncWrite + Unpin> Muxer<C> {
    fn new(conn: yamux::Connection<DeferFlush<C>>) -> Self {
        Self {
            conn,
            waiting: VecDeque::new(),
            inbound_waker: None,
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<yamux::Stream, yamux::ConnectionError>> {
        match self.conn.poll_next_inbound(cx) {
            Poll::Ready(Some(r)) => Poll::Ready(r),
            Poll::Ready(None) => Poll::Ready(Err(yamux::ConnectionError::Closed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin> StreamMuxer for Muxer<C> {
    type Substream = yamux::Stream;
    type Error = yamux::ConnectionError;

    fn poll_inbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<yamux::Stream, Self::Error>> {
        let this = self.get_mut();
        if let Some(s) = this.waiting.pop_front() {
            return Poll::Ready(Ok(s));
        }
        let r = this.poll_next(cx);
        if r.is_pending() {
            this.inbound_waker = Some(cx.waker().clone());
        }
        r
    }

    fn poll_outbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<yamux::Stream, Self::Error>> {
        self.get_mut().conn.poll_new_outbound(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().conn.poll_close(cx)
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        let this = self.get_mut();
        let stream = match this.poll_next(cx) {
            Poll::Ready(r) => r?,
            Poll::Pending => return Poll::Pending,
        };
        if this.waiting.len() < MAX_WAITING_INBOUND {
            this.waiting.push_back(stream);
            if let Some(w) = this.inbound_waker.take() {
                w.wake();
            }
        } else {
            tracing::warn!(stream = %stream, "too many inbound streams waiting; resetting one");
        }
        // More frames may be ready: come back at once, after others have had their turn.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The connection's socket as yamux sees it, with each flush put off by one poll of the
/// connection while frames keep coming.
///
/// A flush that follows a write is answered `Pending` once, and the task is woken at once, so
/// it is polled again straight away. yamux goes on sending the frames it has meanwhile (it
/// does not wait for its flushes), and Noise collects them in its own buffer, which it writes
/// to the socket when it holds 128 KiB (two frames). A flush with nothing written since goes
/// through, so no byte waits longer than one more poll of the connection task.
pub struct DeferFlush<C> {
    io: C,
    /// Bytes were written since the last flush went through.
    written: bool,
    /// A flush was put off since the last write.
    deferred: bool,
}

impl<C> DeferFlush<C> {
    fn new(io: C) -> Self {
        Self {
            io,
            written: false,
            deferred: false,
        }
    }
}

impl<C: AsyncRead + Unpin> AsyncRead for DeferFlush<C> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for DeferFlush<C> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.written = true;
            self.deferred = false;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.written && !self.deferred {
            self.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        futures::ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.written = false;
        self.deferred = false;
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A socket that records what reached it and how often it was flushed.
    #[derive(Default)]
    struct Recorder {
        bytes: Vec<u8>,
        flushes: usize,
    }

    impl AsyncRead for Recorder {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut [u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(0))
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    struct CountWakes(AtomicUsize);

    impl futures::task::ArcWake for CountWakes {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_flush_after_a_write_waits_one_poll_and_wakes_its_task() {
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = DeferFlush::new(Recorder::default());
        let mut io = Pin::new(&mut io);

        // Nothing written: the flush goes straight through.
        assert!(matches!(io.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!((io.io.flushes, wakes.0.load(Ordering::Relaxed)), (1, 0));

        // Written: the first flush is put off, and the task is woken to come back.
        assert!(matches!(
            io.as_mut().poll_write(&mut cx, b"frame 1"),
            Poll::Ready(Ok(7))
        ));
        assert!(io.as_mut().poll_flush(&mut cx).is_pending());
        assert_eq!((io.io.flushes, wakes.0.load(Ordering::Relaxed)), (1, 1));

        // Another write in between puts the flush off again; then it goes through.
        assert!(matches!(
            io.as_mut().poll_write(&mut cx, b"frame 2"),
            Poll::Ready(Ok(7))
        ));
        assert!(io.as_mut().poll_flush(&mut cx).is_pending());
        assert!(matches!(io.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!((io.io.flushes, wakes.0.load(Ordering::Relaxed)), (2, 2));
        assert_eq!(io.io.bytes, b"frame 1frame 2");

        // And a flush right after that has nothing to wait for.
        assert!(matches!(io.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(io.io.flushes, 3);
    }
}
