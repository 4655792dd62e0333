//! The WebSocket upgrade (axum's checks, done here) and the upgraded [`Socket`]: frames are read with one `recv`
//! into a per-thread scratch buffer and decoded where they lie ([`webcall_wsframe`]); a connection keeps bytes of
//! its own only while a frame is unfinished. With tungstenite an idle connection kept a read buffer, a write
//! buffer at its largest frame's size and a ~360-byte wrapper (see BENCHMARKS.md), and every message was copied.

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncWriteExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tungstenite::handshake::derive_accept_key;
use webcall_wsframe::{opcode, Decoder, Event, Violation};

/// An accepted WebSocket, boxed: the connection's future moves it through a few layers of `async` (each of which
/// would otherwise keep its own copy for the connection's life).
pub type WebSocket = Box<Socket<TokioIo<hyper::upgrade::Upgraded>>>;

/// Extractor for a WebSocket upgrade request (HTTP/1.1), like axum's.
pub struct WebSocketUpgrade {
    max_message: usize,
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
    on_failed: Option<Box<dyn FnOnce(hyper::Error) + Send>>,
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
}

fn rejection(status: StatusCode, why: &'static str) -> Response {
    (status, why).into_response()
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketUpgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        if parts.version > Version::HTTP_11 {
            return Err(rejection(StatusCode::BAD_REQUEST, "WebSocket upgrades need HTTP/1.1\n"));
        }
        if parts.method != Method::GET {
            return Err(rejection(StatusCode::METHOD_NOT_ALLOWED, "Request method must be `GET`\n"));
        }
        if !header_has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(rejection(StatusCode::BAD_REQUEST, "Connection header did not include 'upgrade'\n"));
        }
        if !header_has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(rejection(StatusCode::BAD_REQUEST, "`Upgrade` header did not include 'websocket'\n"));
        }
        if parts.headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
            return Err(rejection(StatusCode::BAD_REQUEST, "`Sec-WebSocket-Version` header did not include '13'\n"));
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(rejection(StatusCode::BAD_REQUEST, "`Sec-WebSocket-Key` header missing\n"));
        };
        let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(rejection(StatusCode::UPGRADE_REQUIRED, "WebSocket request couldn't be upgraded\n"));
        };
        Ok(WebSocketUpgrade { max_message: 64 << 20, key, on_upgrade, on_failed: None })
    }
}

impl WebSocketUpgrade {
    /// The largest message accepted (all its fragments together); larger ones are refused from their header.
    pub fn max_message_size(mut self, max: usize) -> Self {
        self.max_message = max;
        self
    }
    pub fn on_failed_upgrade(mut self, f: impl FnOnce(hyper::Error) + Send + 'static) -> Self {
        self.on_failed = Some(Box::new(f));
        self
    }

    /// Answers 101 and runs `callback` with the socket once the upgrade completes.
    pub fn on_upgrade<F, Fut>(self, callback: F) -> Response
    where
        F: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let WebSocketUpgrade { max_message, key, on_upgrade, on_failed } = self;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    callback(Box::new(Socket::new(TokioIo::new(upgraded), max_message))).await;
                }
                Err(e) => {
                    if let Some(f) = on_failed {
                        f(e);
                    }
                }
            }
        });
        let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes())).expect("base64 is a valid header value");
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, HeaderValue::from_static("upgrade"))
            .header(header::UPGRADE, HeaderValue::from_static("websocket"))
            .header(header::SEC_WEBSOCKET_ACCEPT, accept)
            .body(axum::body::Body::empty())
            .expect("static response parts")
    }
}

/// Size of the per-thread buffer every socket read goes into.
const SCRATCH: usize = 64 * 1024;

/// The per-thread write buffer keeps at most this much capacity between writes.
const WRITE_BUF_KEEP: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
    /// Frames are encoded here and written from here; a connection copies only what the socket did not take.
    static WRITE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Why reading stopped for good.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    /// The client broke the protocol; close with the violation's code.
    Violation(Violation),
}

/// What one read did.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Every whole frame read was handed out; read again.
    More,
    /// The client closed the connection.
    Eof,
    /// The handler asked to stop (the client's close frame, or pacing); frames after it are kept for the next call.
    Stopped,
}

/// What one `poll_read` that filled `n` bytes means for the caller; `None`: decode them.
fn read_done(r: Poll<io::Result<()>>, n: usize) -> Option<Poll<Result<Read, ReadError>>> {
    match r {
        Poll::Pending => Some(Poll::Pending),
        Poll::Ready(Err(e)) => Some(Poll::Ready(Err(ReadError::Io(e)))),
        Poll::Ready(Ok(())) if n == 0 => Some(Poll::Ready(Ok(Read::Eof))),
        Poll::Ready(Ok(())) => None,
    }
}

/// An upgraded WebSocket connection (server side).
pub struct Socket<T> {
    io: T,
    decoder: Decoder,
    /// The start of an unfinished frame; empty (no allocation) between whole frames.
    partial: Vec<u8>,
    /// The unfinished frame's size as far as known.
    need: usize,
    /// `partial` may hold whole frames: reading stopped (paced) before they were handed out. Decode before reading.
    held: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Socket<T> {
    pub fn new(io: T, max_message: usize) -> Self {
        Socket { io, decoder: Decoder::new(max_message), partial: Vec::new(), need: 0, held: false }
    }

    /// Reads once and hands every whole frame read to `on` (which returns `false` to stop: frames after that one
    /// are kept, and handed out first by the next call).
    pub fn poll_read_frames(
        &mut self,
        cx: &mut Context<'_>,
        on: &mut dyn FnMut(Event<'_>) -> bool,
    ) -> Poll<Result<Read, ReadError>> {
        let Socket { io, decoder, partial, need, held } = self;
        if std::mem::take(held) {
            let d = decoder.decode(partial, on).map_err(ReadError::Violation)?;
            if d.consumed == partial.len() {
                *partial = Vec::new();
            } else {
                partial.drain(..d.consumed);
                *need = d.need;
                *held = d.stopped;
            }
            return Poll::Ready(Ok(if d.stopped { Read::Stopped } else { Read::More }));
        }
        if partial.is_empty() {
            return SCRATCH_BUF.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let mut rb = ReadBuf::new(&mut scratch[..]);
                let r = Pin::new(&mut *io).poll_read(cx, &mut rb);
                let n = rb.filled().len();
                if let Some(done) = read_done(r, n) {
                    return done;
                }
                let got = &mut scratch[..n];
                let d = decoder.decode(got, on).map_err(ReadError::Violation)?;
                if d.consumed < n {
                    *partial = got[d.consumed..].to_vec();
                    *need = d.need;
                    *held = d.stopped;
                }
                Poll::Ready(Ok(if d.stopped { Read::Stopped } else { Read::More }))
            });
        }
        // Finishing a frame: read into the connection's own buffer, at least what the frame still needs.
        let want = need.saturating_sub(partial.len()).max(4096);
        partial.reserve(want);
        let mut rb = ReadBuf::uninit(partial.spare_capacity_mut());
        let r = Pin::new(&mut *io).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        if let Some(done) = read_done(r, n) {
            return done;
        }
        // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity (that is what `filled` counts).
        unsafe { partial.set_len(partial.len() + n) };
        let d = decoder.decode(partial, on).map_err(ReadError::Violation)?;
        if d.consumed == partial.len() {
            *partial = Vec::new();
        } else {
            partial.drain(..d.consumed);
            *need = d.need;
            *held = d.stopped;
        }
        Poll::Ready(Ok(if d.stopped { Read::Stopped } else { Read::More }))
    }

    /// Writes encoded frames (all of them, or fails) and flushes them.
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Writes text frames with these payloads if the socket takes them now, without waiting: `Ok(None)` when all
    /// went out, else `Ok(Some(rest))`, the encoded bytes it did not take (all of them if it took none), to be
    /// written with [`Socket::write`] before anything else. The relay's usual case: no future, no buffer of the
    /// connection's, one `send`.
    pub fn try_write_texts<P: AsRef<str>>(&mut self, payloads: &[P]) -> io::Result<Option<Vec<u8>>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let io = &mut self.io;
        WRITE_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            for p in payloads {
                webcall_wsframe::encode(&mut buf, opcode::TEXT, p.as_ref().as_bytes());
            }
            let written = match Pin::new(&mut *io).poll_write(&mut cx, &buf) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => 0,
            };
            let rest = if written == buf.len() && Pin::new(&mut *io).poll_flush(&mut cx).is_ready() {
                None
            } else {
                Some(buf[written..].to_vec())
            };
            if buf.capacity() > WRITE_BUF_KEEP {
                *buf = Vec::new();
            }
            Ok(rest)
        })
    }

    /// Writes text frames with these payloads (all of them, or fails) without a buffer of their own in the usual
    /// case: encoded into a per-thread buffer and written from there with one `send` ([`Socket::try_write_texts`]).
    /// Only what the socket does not take at once is copied into a buffer of the connection's and written from
    /// there. (A buffer per write meant an allocation for each relayed message, ~1 KiB: past glibc's per-thread
    /// cache, so on its slower path.)
    pub async fn write_texts<P: AsRef<str>>(&mut self, payloads: &[P]) -> io::Result<()> {
        match self.try_write_texts(payloads)? {
            None => Ok(()),
            Some(rest) => self.write(&rest).await,
        }
    }

    /// Writes one frame.
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut out = Vec::new();
        webcall_wsframe::encode(&mut out, opcode, payload);
        self.write(&out).await
    }

    /// Writes a close frame.
    pub async fn send_close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        let mut out = Vec::new();
        webcall_wsframe::encode_close(&mut out, code, reason);
        self.write(&out).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    fn client_text(s: &str) -> Vec<u8> {
        let mask = [7u8, 1, 2, 3];
        let mut out = vec![0x81];
        match s.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(s.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Frames split at every odd place across reads (and larger than the scratch buffer) come out whole, and
    /// nothing is kept once they are out.
    #[tokio::test]
    async fn frames_split_across_reads_come_out_whole() {
        let big = "b".repeat(SCRATCH + 5000);
        let msgs = ["hello".to_string(), "x".repeat(300), big, "last".to_string()];
        let wire: Vec<u8> = msgs.iter().flat_map(|m| client_text(m)).collect();
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            // Odd-sized writes, so frame boundaries fall everywhere.
            for chunk in wire.chunks(777) {
                w.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut s = Socket::new(r, 1 << 20);
        let mut got: Vec<String> = Vec::new();
        loop {
            let r = poll_fn(|cx| {
                s.poll_read_frames(cx, &mut |e| {
                    if let Event::Text(t) = e {
                        got.push(t.to_string());
                    }
                    true
                })
            })
            .await
            .unwrap();
            if r == Read::Eof {
                break;
            }
        }
        writer.await.unwrap();
        assert_eq!(got, msgs);
        assert_eq!(s.partial.capacity(), 0, "nothing kept once every frame is out");
    }

    /// A handler that stops (pacing) leaves the frames after that one for the next call, which hands them out
    /// without waiting for the socket.
    #[tokio::test]
    async fn frames_after_a_stop_are_kept_for_the_next_call() {
        let wire: Vec<u8> = ["one", "two", "three"].iter().flat_map(|m| client_text(m)).collect();
        let (mut w, r) = tokio::io::duplex(1024);
        w.write_all(&wire).await.unwrap();
        let mut s = Socket::new(r, 1024);
        let mut got: Vec<String> = Vec::new();
        for want in [Read::Stopped, Read::Stopped, Read::Stopped] {
            let r = poll_fn(|cx| {
                s.poll_read_frames(cx, &mut |e| {
                    if let Event::Text(t) = e {
                        got.push(t.to_string());
                    }
                    false
                })
            })
            .await
            .unwrap();
            assert_eq!(r, want);
        }
        assert_eq!(got, ["one", "two", "three"]);
        assert_eq!(s.partial.capacity(), 0, "nothing kept once every frame is out");
        drop(w);
        assert_eq!(poll_fn(|cx| s.poll_read_frames(cx, &mut |_| true)).await.unwrap(), Read::Eof);
    }

    #[tokio::test]
    async fn a_violation_ends_reading() {
        let (mut w, r) = tokio::io::duplex(1024);
        w.write_all(&[0x81, 0x01, b'a']).await.unwrap(); // unmasked
        let mut s = Socket::new(r, 1024);
        let r = poll_fn(|cx| s.poll_read_frames(cx, &mut |_| true)).await;
        assert!(matches!(r, Err(ReadError::Violation(Violation::Protocol(_)))), "{r:?}");
    }

    /// `write_texts` puts the same bytes on the wire as encoding each frame into one buffer, whether the socket
    /// takes everything at once or only part (a small pipe), for one frame and for many, small and large.
    #[tokio::test]
    async fn text_frames_are_written_whole_and_in_order() {
        let sizes = [0, 5, 125, 126, 300, 0xFFFF, 0x10000, 70_000];
        for count in [1, 3, 8, 9, 20] {
            for pipe in [64, 1 << 20] {
                let frames: Vec<std::sync::Arc<str>> = (0..count)
                    .map(|i| {
                        std::sync::Arc::from(char::from(b'a' + i as u8).to_string().repeat(sizes[i % sizes.len()]))
                    })
                    .collect();
                let mut want = Vec::new();
                for f in &frames {
                    webcall_wsframe::encode(&mut want, opcode::TEXT, f.as_bytes());
                }
                let (w, mut r) = tokio::io::duplex(pipe);
                let reader = tokio::spawn(async move {
                    let mut got = Vec::new();
                    tokio::io::AsyncReadExt::read_to_end(&mut r, &mut got).await.unwrap();
                    got
                });
                let mut s = Socket::new(w, 1024);
                s.write_texts(&frames).await.unwrap();
                drop(s);
                assert!(reader.await.unwrap() == want, "{count} frames through a {pipe}-byte pipe");
            }
        }
    }
}
