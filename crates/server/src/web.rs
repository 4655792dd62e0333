//! The browser client, embedded in the binary from `web/` (read from disk in debug builds, so edits show on
//! reload).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use crate::access::{ConnCap, Counted};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(rust_embed::Embed)]
#[folder = "../../web"]
#[exclude = "*.md"]
struct Assets;

/// The file at `path` in `web/`, with its content type; 404 when there is none.
pub fn asset(path: &str) -> Response {
    match Assets::get(path) {
        Some(file) => {
            let mime = file.metadata.mimetype().to_owned();
            let cache = if path.ends_with(".html") { "no-cache" } else { "public, max-age=300" };
            ([(header::CONTENT_TYPE, mime), (header::CACHE_CONTROL, cache.to_owned())], file.data).into_response()
        }
        None => (StatusCode::NOT_FOUND, format!("no such file: /{path}\n")).into_response(),
    }
}

/// The page's policy: scripts (ES modules), styles and images only from this server, the signaling WebSocket to it,
/// video from `MediaStream`s, no plugins, no framing. Inline `style="…"` attributes stay allowed (the icon sprite
/// uses one); inline scripts do not.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    style-src-attr 'unsafe-inline'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; \
    connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Adds the security headers to every response (pages, assets, errors).
pub async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

/// The call page for a room name that is not valid, with status 400: the page explains the rule and offers a
/// valid name (a plain-text 400 would leave a person who mistyped a link with nothing to do).
pub fn bad_room_page() -> Response {
    let mut page = asset("call.html");
    *page.status_mut() = StatusCode::BAD_REQUEST;
    page
}

/// The first acceptor on a TLS port, after the per-address cap: a connection whose first byte is not a TLS
/// handshake record (0x16) is plain HTTP (someone typed `http://` for the HTTPS port) and gets a redirect to the same
/// address over `https://` instead of a protocol error; the others go on to the TLS handshake.
#[derive(Clone)]
pub struct PlainHttpRedirect(pub ConnCap);

/// How long a plain-HTTP client may take to send its request head, and its largest size.
const REDIRECT_READ_TIMEOUT: Duration = Duration::from_secs(5);
const REDIRECT_MAX_HEAD: usize = 8192;

impl<S: Send + 'static> axum_server::accept::Accept<TcpStream, S> for PlainHttpRedirect {
    type Stream = Counted;
    type Service = S;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Counted, S)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let counted = self.0.accept(stream, service);
        Box::pin(async move {
            let (stream, service) = counted.await?;
            let mut first = [0u8; 1];
            let n = tokio::time::timeout(REDIRECT_READ_TIMEOUT, stream.peek(&mut first))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no first byte"))??;
            if n == 0 || first[0] == 0x16 {
                return Ok((stream, service));
            }
            redirect_to_https(stream).await;
            Err(io::Error::other("plain HTTP on the TLS port: redirected to https"))
        })
    }
}

/// Reads a plain HTTP request head and answers 301 to `https://<Host><path>` (400 when it has no usable Host).
async fn redirect_to_https(mut stream: Counted) {
    let mut head = Vec::with_capacity(1024);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REDIRECT_MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        io::Result::Ok(())
    };
    if !matches!(tokio::time::timeout(REDIRECT_READ_TIMEOUT, read).await, Ok(Ok(()))) {
        return;
    }
    let response = match https_location(&head) {
        Some(location) => format!(
            "HTTP/1.1 301 Moved Permanently\r\nLocation: {location}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{location}\n",
            location.len() + 1
        ),
        None => {
            let body = "this port speaks HTTPS: use https://\n";
            format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
    };
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// `https://<Host><path>` of a plain HTTP request head, when its Host and path are plain enough to echo safely.
fn https_location(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let path = lines.next()?.split(' ').nth(1)?;
    let host = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("host").then(|| value.trim())
    })?;
    let host_ok = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    let path_ok = path.starts_with('/') && !path.starts_with("//") && path.bytes().all(|b| b.is_ascii_graphic());
    (host_ok && path_ok).then(|| format!("https://{host}{path}"))
}

#[cfg(test)]
mod tests {
    use super::https_location;

    #[test]
    fn location_of_a_plain_request() {
        let head = b"GET /r/daily?name=A HTTP/1.1\r\nHost: 192.168.1.5:8443\r\nAccept: */*\r\n\r\n";
        assert_eq!(https_location(head).as_deref(), Some("https://192.168.1.5:8443/r/daily?name=A"));
        assert_eq!(
            https_location(b"GET / HTTP/1.1\r\nhost: [::1]:8443\r\n\r\n").as_deref(),
            Some("https://[::1]:8443/")
        );
        // Nothing odd is echoed: no Host, a Host with other characters, a scheme-relative path.
        assert_eq!(https_location(b"GET / HTTP/1.0\r\n\r\n"), None);
        assert_eq!(https_location(b"GET / HTTP/1.1\r\nHost: a.example/evil\r\n\r\n"), None);
        assert_eq!(https_location(b"GET //evil.example/ HTTP/1.1\r\nHost: a\r\n\r\n"), None);
    }
}
