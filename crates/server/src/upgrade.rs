//! The WebSocket upgrade, done here instead of with axum's `WebSocketUpgrade` (same checks, same builder methods) so
//! that the socket is read through [`ScratchIo`].
//!
//! tungstenite allocates `read_buffer_size` bytes for every connection up front, zero-fills them and keeps them for
//! the connection's life, and reads at most that much per call. With axum's 4 KiB that was 4 KiB of a ~9.3 KiB idle
//! connection (see BENCHMARKS.md). Through `ScratchIo` the buffer can be small: a read goes into one per-thread
//! scratch buffer with a single `recv`, and only the part tungstenite has not taken yet is kept, until it takes it.

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

pub use tokio_tungstenite::tungstenite::protocol::CloseFrame;
pub use tokio_tungstenite::tungstenite::{Error, Message, Utf8Bytes};

/// An accepted WebSocket, boxed: the connection's future moves it through a few layers of `async` (each of which
/// would otherwise keep its own copy of its ~360 bytes for the connection's life).
pub type WebSocket = Box<WebSocketStream<ScratchIo<TokioIo<hyper::upgrade::Upgraded>>>>;

/// Extractor for a WebSocket upgrade request (HTTP/1.1), like axum's.
pub struct WebSocketUpgrade {
    config: WebSocketConfig,
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
    on_failed: Option<Box<dyn FnOnce(hyper::Error) + Send>>,
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
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
        Ok(WebSocketUpgrade { config: WebSocketConfig::default(), key, on_upgrade, on_failed: None })
    }
}

impl WebSocketUpgrade {
    pub fn max_message_size(mut self, max: usize) -> Self {
        self.config = self.config.max_message_size(Some(max));
        self
    }
    pub fn max_frame_size(mut self, max: usize) -> Self {
        self.config = self.config.max_frame_size(Some(max));
        self
    }
    /// tungstenite's per-connection read buffer (also the most it reads per call; [`ScratchIo`] makes that cheap).
    pub fn read_buffer_size(mut self, size: usize) -> Self {
        self.config = self.config.read_buffer_size(size);
        self
    }
    pub fn write_buffer_size(mut self, size: usize) -> Self {
        self.config = self.config.write_buffer_size(size);
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
        let WebSocketUpgrade { config, key, on_upgrade, on_failed } = self;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let io = ScratchIo::new(TokioIo::new(upgraded));
                    callback(Box::new(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await)).await;
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

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Reads the inner stream through a per-thread scratch buffer, keeping per connection only what the caller has not
/// taken yet (nothing, most of the time). Writes go straight through.
pub struct ScratchIo<T> {
    inner: T,
    rest: Vec<u8>,
    at: usize,
}

impl<T> ScratchIo<T> {
    pub fn new(inner: T) -> Self {
        ScratchIo { inner, rest: Vec::new(), at: 0 }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ScratchIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if me.at < me.rest.len() {
            let n = (me.rest.len() - me.at).min(buf.remaining());
            buf.put_slice(&me.rest[me.at..me.at + n]);
            me.at += n;
            if me.at == me.rest.len() {
                me.rest = Vec::new();
                me.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= SCRATCH {
            return Pin::new(&mut me.inner).poll_read(cx, buf);
        }
        SCRATCH_BUF.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut rb = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    let n = got.len().min(buf.remaining());
                    buf.put_slice(&got[..n]);
                    if n < got.len() {
                        me.rest = got[n..].to_vec();
                        me.at = 0;
                    }
                    Poll::Ready(Ok(()))
                }
                other => other,
            }
        })
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ScratchIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn small_reads_take_one_inner_read_and_keep_nothing_after() {
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let (mut w, r) = tokio::io::duplex(8192);
        tokio::io::AsyncWriteExt::write_all(&mut w, &data).await.unwrap();
        drop(w);
        let mut s = ScratchIo::new(r);
        let mut out = Vec::new();
        let mut chunk = [0u8; 100];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(out, data);
        assert_eq!(s.rest.capacity(), 0, "nothing kept once drained");
    }
}
