//! `POST`/`DELETE /api/rooms/{room}/recording`: start and stop recording an SFU room from outside it, with the
//! auth secret as the bearer token (docs/recording.md).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use webcall_rooms::RecordRefusal;

use crate::whip::{bearer, check_room, constant_eq, err, HttpError};
use crate::AppState;

/// Only the holder of `--auth-secret` may call: a server without one has no credential for this API.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), HttpError> {
    let Some(secret) = &state.cfg.auth_secret else {
        return Err(err(
            StatusCode::FORBIDDEN,
            "the recording API needs a server started with --auth-secret (the secret is its Bearer token); \
             participants can still record from the page",
        ));
    };
    match bearer(headers)? {
        Some(b) if constant_eq(secret, &b) => Ok(()),
        Some(_) => Err(err(StatusCode::UNAUTHORIZED, "the Bearer token is not this server's --auth-secret")),
        None => {
            Err(err(StatusCode::UNAUTHORIZED, "send the server's --auth-secret as 'Authorization: Bearer <secret>'"))
        }
    }
}

fn refusal(e: RecordRefusal) -> HttpError {
    let status = match e {
        RecordRefusal::NoRoom(_) => StatusCode::NOT_FOUND,
        RecordRefusal::Off | RecordRefusal::NotSfu(_) | RecordRefusal::Clustered => StatusCode::CONFLICT,
    };
    err(status, e.to_string())
}

fn json(status: StatusCode, room: &str, recording: bool) -> Response {
    let body = serde_json::json!({ "room": room, "recording": recording }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn set(state: &AppState, room: &str, headers: &HeaderMap, start: bool) -> Result<Response, HttpError> {
    authorize(state, headers)?;
    check_room(room)?;
    let changed = state.router.set_recording(room, start, "api").map_err(refusal)?;
    Ok(match (start, changed) {
        (true, true) => json(StatusCode::CREATED, room, true),
        (true, false) => json(StatusCode::OK, room, true),
        (false, true) => StatusCode::NO_CONTENT.into_response(),
        (false, false) => return Err(err(StatusCode::NOT_FOUND, format!("room '{room}' is not being recorded"))),
    })
}

pub(crate) async fn start(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
) -> Response {
    set(&state, &room, &headers, true).unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn stop(State(state): State<Arc<AppState>>, Path(room): Path<String>, headers: HeaderMap) -> Response {
    set(&state, &room, &headers, false).unwrap_or_else(IntoResponse::into_response)
}
