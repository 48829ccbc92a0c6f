//! A yamux data frame's header sent in the same TLS record as its body.
//!
//! rustls (through `futures-rustls`) seals whatever one `write` hands it into records and
//! writes them to the socket at once. yamux writes each frame's 12-byte header apart from its
//! body, so under TLS every data frame cost two records and two socket writes, and every small
//! control message (a request, a response) woke the peer twice: the federated round of eight
//! clients and a 4 KiB model (W2 in docs/benchmarks.md) ran about a quarter slower than under
//! Noise, whose own buffer gathers a frame's writes. [`Coalesce`] holds the header of a data
//! frame whose body fits in the same record until the body comes, then the record goes at
//! once. Every other write passes straight through: window updates, pings, frames without a
//! body (nothing waits for a flush that yamux may put off), and bulk frames, whose header costs
//! one small record per 256 KiB. (Sending a bulk frame's header and body in one vectored write,
//! so that rustls cuts records across both, measured slower on the bare stream: 805 against
//! 970 MiB/s, medians of five interleaved `bench blob --size 1GiB` runs.)

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::{AsyncRead, AsyncWrite};

/// Most plaintext bytes one TLS record carries (RFC 8446, section 5.1).
pub const RECORD_PLAINTEXT: usize = 16 * 1024;

/// Bytes of a yamux frame header: version, type, flags (2), stream id (4), length (4).
const HEADER: usize = 12;

/// The body length a write announces when it is exactly the header of a yamux data frame
/// whose body fits in the header's record; `None` for anything else.
fn small_data_body(buf: &[u8]) -> Option<usize> {
    let header: &[u8; HEADER] = buf.try_into().ok()?;
    let len = u32::from_be_bytes([header[8], header[9], header[10], header[11]]) as usize;
    (header[0] == 0 && header[1] == 0 && len > 0 && HEADER + len <= RECORD_PLAINTEXT).then_some(len)
}

/// A writer that holds a data frame's header until its body is written.
pub struct Coalesce<W> {
    inner: W,
    /// A header, and as much of its body as came, not yet handed to `inner`; never more than
    /// a record.
    held: Vec<u8>,
    /// Body bytes of the held frame still to come.
    owed: usize,
}

impl<W> Coalesce<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            held: Vec::new(),
            owed: 0,
        }
    }
}

impl<W: AsyncWrite + Unpin> Coalesce<W> {
    /// Hands every held byte to `inner`.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        self.owed = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncRead + Unpin> AsyncRead for Coalesce<W> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Coalesce<W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // A whole frame whose record the socket did not take at once goes first.
        if !this.held.is_empty() && this.owed == 0 {
            ready!(this.poll_release(cx))?;
        }
        if this.held.is_empty() {
            if let Some(len) = small_data_body(buf) {
                this.held.extend_from_slice(buf);
                this.owed = len;
                return Poll::Ready(Ok(buf.len()));
            }
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        // `buf` is (part of) the held header's body.
        if this.held.len() + buf.len() <= RECORD_PLAINTEXT {
            this.held.extend_from_slice(buf);
            this.owed = this.owed.saturating_sub(buf.len());
            if this.owed == 0 {
                // Taken either way: what the socket cannot take now goes before the next
                // write, or at the flush.
                if let Poll::Ready(Err(e)) = this.poll_release(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            return Poll::Ready(Ok(buf.len()));
        }
        // More than the header announced (yamux never does this): the held bytes go first.
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSlice;

    /// A socket that records each write it took (as one vectored write is one entry), taking
    /// at most `cap` bytes per write, and counts flushes.
    struct Recorder {
        writes: Vec<Vec<u8>>,
        cap: usize,
        flushes: usize,
    }

    impl Recorder {
        fn new(cap: usize) -> Self {
            Self {
                writes: Vec::new(),
                cap,
                flushes: 0,
            }
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut took = Vec::new();
            for b in bufs {
                let n = b.len().min(self.cap - took.len());
                took.extend_from_slice(&b[..n]);
            }
            let n = took.len();
            self.writes.push(took);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write_all(w: &mut Coalesce<Recorder>, mut buf: &[u8]) {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        while !buf.is_empty() {
            match Pin::new(&mut *w).poll_write(&mut cx, buf) {
                Poll::Ready(Ok(n)) => buf = &buf[n..],
                other => panic!("write: {other:?}"),
            }
        }
    }

    fn flush(w: &mut Coalesce<Recorder>) {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(Pin::new(&mut *w).poll_flush(&mut cx), Poll::Ready(Ok(()))));
    }

    /// A yamux header: data (type 0) or window update (type 1), with its length field.
    fn header(kind: u8, len: u32) -> Vec<u8> {
        let mut h = vec![0, kind, 0, 0, 0, 0, 0, 3];
        h.extend_from_slice(&len.to_be_bytes());
        h
    }

    #[test]
    fn a_small_frame_reaches_the_socket_as_one_write_without_waiting_for_a_flush() {
        let mut w = Coalesce::new(Recorder::new(usize::MAX));
        write_all(&mut w, &header(0, 100));
        assert!(w.inner.writes.is_empty(), "the header waits for its body");
        write_all(&mut w, &[2; 60]);
        write_all(&mut w, &[3; 40]);
        assert_eq!(w.inner.writes.len(), 1);
        assert_eq!(w.inner.writes[0].len(), 112);
        flush(&mut w);
        assert_eq!((w.inner.writes.len(), w.inner.flushes), (1, 1));
    }

    #[test]
    fn a_bulk_frame_passes_straight_through() {
        let mut w = Coalesce::new(Recorder::new(usize::MAX));
        let body = vec![7; RECORD_PLAINTEXT - HEADER + 1];
        let head = header(0, body.len() as u32);
        write_all(&mut w, &head);
        write_all(&mut w, &body);
        assert_eq!(w.inner.writes, vec![head, body]);
    }

    #[test]
    fn frames_without_a_body_pass_straight_through() {
        let mut w = Coalesce::new(Recorder::new(usize::MAX));
        write_all(&mut w, &header(1, 65_536)); // a window update
        write_all(&mut w, &header(0, 0)); // a data frame with only flags (FIN, say)
        assert_eq!(w.inner.writes, vec![header(1, 65_536), header(0, 0)]);
    }

    #[test]
    fn partial_writes_of_the_socket_lose_and_repeat_nothing() {
        // A socket that takes 5,000 bytes at a time: held bytes drain over several writes,
        // and the bytes come out in order, each once.
        let mut w = Coalesce::new(Recorder::new(5000));
        let mut want = Vec::new();
        for (i, len) in [3000usize, 40_000, 7, 16_372, 16_373, 1].into_iter().enumerate() {
            let body = vec![i as u8; len];
            for piece in [header(0, len as u32), body] {
                write_all(&mut w, &piece);
                want.extend_from_slice(&piece);
            }
            let update = header(1, 9);
            write_all(&mut w, &update);
            want.extend_from_slice(&update);
        }
        flush(&mut w);
        assert_eq!(w.inner.writes.concat(), want);
        assert!(w.inner.writes.iter().all(|b| b.len() <= 5000 && !b.is_empty()));
    }
}
