//! The browser client, embedded in the binary from `web/` (read from disk in debug builds, so edits show on
//! reload).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(rust_embed::Embed)]
#[folder = "../../web"]
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
