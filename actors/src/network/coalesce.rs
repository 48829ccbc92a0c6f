//! Small yamux frames gathered into whole TLS records until a flush, as Noise gathers them.
//!
//! rustls (through `futures-rustls`) seals whatever one `write` hands it into records and
//! writes them to the socket at once. yamux writes each frame's 12-byte header apart from its
//! body, and multistream-select writes a new stream's protocol in a frame of its own, so under
//! TLS every small control message (a request, a response, a stream's opening) cost several
//! records, socket writes and wake-ups of the peer, and the federated round of eight clients and
//! a 4 KiB model (W2 in docs/benchmarks.md) ran a fifth to a quarter slower than under Noise,
//! whose own buffer holds everything written until a flush. [`Coalesce`] does what Noise does
//! for data frames that fit in a record: it holds them, up to a record, until the flush that
//! yamux sends after its frames (which `DeferFlush` may put off by one poll). Two kinds pass
//! straight through, after whatever is held: control frames (window updates, pings, go-away),
//! so that a sender waiting for credit never waits for our flush, and bulk frames, whose
//! records rustls writes at once anyway. Measured: holding every small write until a flush,
//! window updates included, cut the bare stream of `bench blob` nearly in half; sending a bulk
//! frame's header and body in one vectored write (records cut across both) cost about a sixth
//! of it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::{AsyncRead, AsyncWrite};

/// Most plaintext bytes one TLS record carries (RFC 8446, section 5.1).
pub const RECORD_PLAINTEXT: usize = 16 * 1024;

/// Bytes of a yamux frame header: version, type, flags (2), stream id (4), length (4).
const HEADER: usize = 12;

/// A yamux frame, as its header tells.
enum Kind {
    /// A data frame of this many bytes, header included.
    Data(usize),
    /// A window update, ping or go-away: the header alone.
    Control,
}

/// The frame whose header starts `buf`; `None` when `buf` does not start with a yamux header.
fn frame(buf: &[u8]) -> Option<Kind> {
    let h = buf.get(..HEADER)?;
    let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
    match (h[0], h[1]) {
        (0, 0) => Some(Kind::Data(HEADER + len)),
        (0, 1..=3) => Some(Kind::Control),
        _ => None,
    }
}

/// Where the next byte written falls.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Next {
    /// At the start of a frame.
    Start,
    /// Inside a held frame, this many bytes before its end.
    Hold(usize),
    /// Inside a frame passed straight through, this many bytes before its end.
    Pass(usize),
}

/// A writer that holds small yamux data frames until a flush.
pub struct Coalesce<W> {
    inner: W,
    /// Whole frames (and the start of one, until its rest is written), not yet handed to
    /// `inner`; never more than a record.
    held: Vec<u8>,
    next: Next,
}

impl<W> Coalesce<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            held: Vec::new(),
            next: Next::Start,
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
        Poll::Ready(Ok(()))
    }

    /// Writes (the start of) a frame of `len` bytes straight through, after what is held.
    fn poll_pass(&mut self, cx: &mut Context<'_>, buf: &[u8], len: usize) -> Poll<io::Result<usize>> {
        ready!(self.poll_release(cx))?;
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &buf[..len.min(buf.len())]))?;
        self.next = if n >= len { Next::Start } else { Next::Pass(len - n) };
        Poll::Ready(Ok(n))
    }

    /// Holds (the start of) a frame of `len` bytes, at most a record.
    fn hold(&mut self, buf: &[u8], len: usize) -> usize {
        let take = len.min(buf.len());
        self.held.extend_from_slice(&buf[..take]);
        self.next = if take == len {
            Next::Start
        } else {
            Next::Hold(len - take)
        };
        take
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
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match this.next {
            Next::Hold(left) => return Poll::Ready(Ok(this.hold(buf, left))),
            Next::Pass(left) => return this.poll_pass(cx, buf, left),
            Next::Start => {}
        }
        match frame(buf) {
            Some(Kind::Data(len)) if len <= RECORD_PLAINTEXT => {
                // Nothing of `buf` is taken before what is held has room beside it.
                if this.held.len() + len > RECORD_PLAINTEXT {
                    ready!(this.poll_release(cx))?;
                }
                Poll::Ready(Ok(this.hold(buf, len)))
            }
            Some(Kind::Data(len)) => this.poll_pass(cx, buf, len),
            Some(Kind::Control) => this.poll_pass(cx, buf, HEADER),
            // Not a yamux frame (yamux writes none such): straight through, as it comes.
            None => this.poll_pass(cx, buf, buf.len()),
        }
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
    fn small_frames_reach_the_socket_as_one_write_at_the_flush() {
        let mut w = Coalesce::new(Recorder::new(usize::MAX));
        write_all(&mut w, &header(0, 100));
        write_all(&mut w, &[2; 60]);
        write_all(&mut w, &[3; 40]);
        write_all(&mut w, &header(0, 0)); // flags only (a stream's FIN, say)
        assert!(w.inner.writes.is_empty(), "held until the flush");
        flush(&mut w);
        assert_eq!(w.inner.writes.len(), 1);
        assert_eq!(w.inner.writes[0].len(), 12 + 100 + 12);
        assert_eq!(w.inner.flushes, 1);
        flush(&mut w);
        assert_eq!(w.inner.writes.len(), 1, "an empty flush writes nothing");
    }

    #[test]
    fn control_frames_go_at_once_after_what_is_held() {
        let mut w = Coalesce::new(Recorder::new(usize::MAX));
        let small = [header(0, 5), vec![1; 5]].concat();
        write_all(&mut w, &small);
        write_all(&mut w, &header(1, 65_536)); // a window update
        assert_eq!(w.inner.writes, vec![small, header(1, 65_536)]);
        assert_eq!(w.inner.flushes, 0);
    }

    #[test]
    fn a_bulk_frame_passes_straight_through_after_what_is_held() {
        let mut w = Coalesce::new(Recorder::new(usize::MAX));
        let small = [header(0, 5), vec![1; 5]].concat();
        let body = vec![7; RECORD_PLAINTEXT - HEADER + 1];
        let head = header(0, body.len() as u32);
        write_all(&mut w, &small);
        write_all(&mut w, &head);
        write_all(&mut w, &body);
        assert_eq!(w.inner.writes, vec![small, head, body]);
    }

    #[test]
    fn held_frames_never_exceed_a_record() {
        let mut w = Coalesce::new(Recorder::new(usize::MAX));
        let frame = [header(0, 6000), vec![4; 6000]].concat();
        for _ in 0..3 {
            write_all(&mut w, &frame);
        }
        flush(&mut w);
        let sizes: Vec<usize> = w.inner.writes.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2 * 6012, 6012]);
    }

    #[test]
    fn partial_writes_of_the_socket_lose_and_repeat_nothing() {
        // A socket that takes 5,000 bytes at a time: held and passed frames go over several
        // writes, and the bytes come out in order, each once.
        let mut w = Coalesce::new(Recorder::new(5000));
        let mut want = Vec::new();
        for (i, len) in [3000usize, 40_000, 7, 16_372, 16_373, 1, 0].into_iter().enumerate() {
            let body = vec![i as u8; len];
            for piece in [header(0, len as u32), body, header(1, 9)] {
                write_all(&mut w, &piece);
                want.extend_from_slice(&piece);
            }
        }
        flush(&mut w);
        assert_eq!(w.inner.writes.concat(), want);
        assert!(w.inner.writes.iter().all(|b| b.len() <= 5000 && !b.is_empty()));
    }
}
