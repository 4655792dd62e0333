//! The browser client, embedded in the binary from `web/` (read from disk in debug builds, so edits show on
//! reload).

use axum::http::{header, StatusCode};
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

/// The call page for a room name that is not valid, with status 400: the page explains the rule and offers a
/// valid name (a plain-text 400 would leave a person who mistyped a link with nothing to do).
pub fn bad_room_page() -> Response {
    let mut page = asset("call.html");
    *page.status_mut() = StatusCode::BAD_REQUEST;
    page
}
