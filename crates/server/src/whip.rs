//! WHIP (RFC 9725) and WHEP (draft-ietf-wish-whep): broadcast tools publish into a room's SFU over plain HTTP,
//! and players watch a room without joining it. See docs/whip.md.
//!
//! A WHIP publisher is a participant: it joins the room through the room core on a connection of the server's own
//! (so tokens, passwords, caps and `hello`/`bye` work as for a page), and its media session is an SFU session that
//! only publishes. A WHEP viewer is only an SFU session that receives one participant's tracks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};
use webcall_protocol::{IceServer, Join, ServerMessage, BYE};
use webcall_rooms::{ConnId, WatchRefusal};
use webcall_sfu::net::{SessionSignal, SfuHandle, SfuNetError};
use webcall_sfu::{SessionId, SessionRole};

use crate::router::ConnSignal;
use crate::AppState;

/// How long a WHIP join may take to be answered by the room core (a cluster's store may be slow).
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The display name of a publisher whose request and token name none.
const DEFAULT_NAME: &str = "WHIP";
const SDP: &str = "application/sdp";
const SDPFRAG: &str = "application/trickle-ice-sdpfrag";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Whip,
    Whep,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Whip => "whip",
            Kind::Whep => "whep",
        }
    }
}

/// A refusal: a status and a sentence that says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct HttpError {
    status: StatusCode,
    message: String,
}

pub(crate) fn err(status: StatusCode, message: impl Into<String>) -> HttpError {
    HttpError { status, message: message.into() }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut r = (self.status, format!("{}\n", self.message)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// One WHIP or WHEP session, addressed by its resource URL.
struct Resource {
    kind: Kind,
    room: String,
    session: SessionId,
    /// The bearer token it was created with: PATCH and DELETE must carry the same.
    bearer: Option<String>,
    etag: Mutex<String>,
    /// The client's last full offer, from which an ICE restart's offer is made.
    offer: Mutex<String>,
    end: Notify,
    /// The media session is over (closed by the client, or dead); the URL answers DELETE a little longer.
    ended: std::sync::atomic::AtomicBool,
}

impl Resource {
    /// A new resource with a fresh ETag, for the client's `offer`.
    fn new(kind: Kind, room: &str, session: SessionId, bearer: Option<String>, offer: String) -> Arc<Resource> {
        Arc::new(Resource {
            kind,
            room: room.to_owned(),
            session,
            bearer,
            etag: Mutex::new(random_id(12)),
            offer: Mutex::new(offer),
            end: Notify::new(),
            ended: Default::default(),
        })
    }
}

/// How long an ended session's URL still answers DELETE (a client closing its peer connection first ends the
/// media session before its DELETE arrives).
const LINGER: Duration = Duration::from_secs(30);

/// Marks a resource ended and forgets it after [`LINGER`].
async fn linger(state: &AppState, id: &str, res: &Arc<Resource>) {
    res.ended.store(true, Ordering::Relaxed);
    tokio::time::sleep(LINGER).await;
    let mut map = state.whip.map.lock();
    if map.get(id).is_some_and(|r| Arc::ptr_eq(r, res)) {
        map.remove(id);
    }
}

/// The live resources, by id (a random, unguessable path segment).
#[derive(Default)]
pub(crate) struct Resources {
    map: Mutex<HashMap<String, Arc<Resource>>>,
}

fn random_id(len: usize) -> String {
    webcall_protocol::random_id(len, rand::random)
}

fn sfu(state: &AppState) -> Result<SfuHandle, HttpError> {
    state.sfu.get().cloned().ok_or_else(|| {
        err(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server runs no SFU for WHIP and WHEP (started with --topology mesh, or with --redis: not clustered yet)",
        )
    })
}

fn check_content_type(headers: &HeaderMap, want: &str) -> Result<(), HttpError> {
    let got = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = got.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(want) {
        Ok(())
    } else {
        let shown = if got.is_empty() { "none" } else { got };
        Err(err(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("Content-Type is {shown}; send the body as {want}")))
    }
}

pub(crate) fn bearer(headers: &HeaderMap) -> Result<Option<String>, HttpError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    let v = v.to_str().unwrap_or("");
    match v.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
            Ok(Some(token.trim().to_owned()))
        }
        _ => Err(err(StatusCode::UNAUTHORIZED, "the Authorization header must be 'Bearer <token>'")),
    }
}

pub(crate) fn check_room(room: &str) -> Result<(), HttpError> {
    if webcall_protocol::valid_room_name(room) {
        Ok(())
    } else {
        Err(err(StatusCode::BAD_REQUEST, "a room name is 1-64 characters of A-Z, a-z, 0-9, '_' and '-'"))
    }
}

/// A quick look before the SFU parses it: an SDP offer starts with `v=0` and has media.
fn check_offer(sdp: &str) -> Result<(), HttpError> {
    if !sdp.trim_start().starts_with("v=0") || !sdp.contains("\nm=") {
        return Err(err(StatusCode::BAD_REQUEST, "the body is not an SDP offer (v=0 and at least one m= line)"));
    }
    Ok(())
}

fn sfu_refusal(e: SfuNetError) -> HttpError {
    match e {
        SfuNetError::Sfu(e) => err(StatusCode::BAD_REQUEST, format!("the SFU cannot use this offer: {e}")),
        e => err(StatusCode::SERVICE_UNAVAILABLE, format!("{e}; try again")),
    }
}

/// The status for a refused join of the room core.
fn join_status(code: &str) -> StatusCode {
    match code {
        "unauthorized" => StatusCode::UNAUTHORIZED,
        "room-full" | "needs-sfu" => StatusCode::CONFLICT,
        "rate-limited" => StatusCode::TOO_MANY_REQUESTS,
        "server-full" | "server-shutdown" | "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// `Link` headers for ICE servers (RFC 9725 section 4.6).
fn links(ice: &[IceServer]) -> Vec<HeaderValue> {
    let q = |s: &str| s.replace(['"', '\\', '\r', '\n'], "");
    let mut out = Vec::new();
    for s in ice {
        for url in &s.urls {
            let mut v = format!("<{}>; rel=\"ice-server\"", q(url));
            if let (Some(u), Some(c)) = (&s.username, &s.credential) {
                v.push_str(&format!("; username=\"{}\"; credential=\"{}\"; credential-type=\"password\"", q(u), q(c)));
            }
            if let Ok(h) = HeaderValue::from_str(&v) {
                out.push(h);
            }
        }
    }
    out
}

/// CORS for browser clients on other origins: bearer tokens, not cookies, so any origin may call, unless
/// `--allowed-origins` says which.
fn cors(state: &AppState, req: &HeaderMap, h: &mut HeaderMap) {
    let origin = req.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let allow = match &state.cfg.allowed_origins {
        None => Some("*".to_owned()),
        Some(allowed) => origin.filter(|o| crate::origin_allowed(allowed, Some(o))).map(str::to_owned),
    };
    if let Some(a) = allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, a);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("POST, PATCH, DELETE, OPTIONS"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type, If-Match"),
        );
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Location, ETag, Link, Accept-Patch, Accept-Post"),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    }
}

fn with_cors(state: &AppState, req: &HeaderMap, r: impl IntoResponse) -> Response {
    let mut r = r.into_response();
    cors(state, req, r.headers_mut());
    r
}

/// `OPTIONS` on an endpoint or a resource: CORS preflight, and what the endpoint takes.
pub(crate) async fn options(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert("accept-post", HeaderValue::from_static(SDP));
    r.headers_mut().insert("accept-patch", HeaderValue::from_static(SDPFRAG));
    with_cors(&state, &headers, r)
}

/// `/metrics` lines: live WHIP publishers and WHEP players.
pub(crate) fn metrics(state: &AppState, out: &mut String) {
    use std::fmt::Write;
    let (mut whip, mut whep) = (0, 0);
    for r in state.whip.map.lock().values().filter(|r| !r.ended.load(Ordering::Relaxed)) {
        match r.kind {
            Kind::Whip => whip += 1,
            Kind::Whep => whep += 1,
        }
    }
    for (name, help, v) in [("whip", "WHIP publishers", whip), ("whep", "WHEP players", whep)] {
        let _ = writeln!(out, "# HELP webcall_{name}_sessions {help}.\n# TYPE webcall_{name}_sessions gauge");
        let _ = writeln!(out, "webcall_{name}_sessions {v}");
    }
}

/// `GET` (someone opened the URL in a browser): say what the endpoint is for.
pub(crate) async fn explain(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let mut r = (
        StatusCode::METHOD_NOT_ALLOWED,
        "this is a WHIP/WHEP endpoint: POST an SDP offer with Content-Type: application/sdp \
         (in OBS: Settings, Stream, Service WHIP, this URL as the Server); see docs/whip.md\n",
    )
        .into_response();
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
    with_cors(&state, &headers, r)
}

#[derive(serde::Deserialize)]
pub(crate) struct WhipQuery {
    /// The publisher's display name (a token's `name` claim wins).
    name: Option<String>,
}

#[derive(serde::Deserialize)]
pub(crate) struct WhepQuery {
    /// The participant (peer id) to watch; without it, the room's first publisher.
    peer: Option<String>,
}

pub(crate) async fn whip_post(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    Query(q): Query<WhipQuery>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let r = publish(&state, &room, q, addr, &headers, body).await;
    with_cors(&state, &headers, r)
}

pub(crate) async fn whep_post(
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    Query(q): Query<WhepQuery>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let r = watch(&state, &room, q, &headers, body).await;
    with_cors(&state, &headers, r)
}

fn created(kind: Kind, room: &str, id: &str, etag: &str, answer: String, ice: &[IceServer]) -> Response {
    let mut r = (StatusCode::CREATED, answer).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(SDP));
    if let Ok(l) = HeaderValue::from_str(&format!("/{}/{room}/{id}", kind.path())) {
        h.insert(header::LOCATION, l);
    }
    if let Ok(e) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        h.insert(header::ETAG, e);
    }
    h.insert("accept-patch", HeaderValue::from_static(SDPFRAG));
    for l in links(ice) {
        h.append(header::LINK, l);
    }
    r
}

/// The room core's answer to the WHIP connection's join: the peer id and ICE servers, or why not.
async fn await_welcome(
    state: &AppState,
    conn: ConnId,
    signal: &ConnSignal,
) -> Result<(String, Vec<IceServer>), HttpError> {
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    loop {
        let mut frames = Vec::new();
        state.router.take(conn, &mut frames);
        for f in frames {
            // hello, data and the like come too; only the answer to the join matters here.
            let Ok(m) = ServerMessage::parse(&f) else { continue };
            match m {
                ServerMessage::Welcome { id, ice_servers, publish, .. } => {
                    if !publish {
                        return Err(err(
                            StatusCode::FORBIDDEN,
                            "the token is subscribe-only; WHIP needs one that may publish",
                        ));
                    }
                    return Ok((id, ice_servers));
                }
                ServerMessage::Error { code, message, .. } => {
                    return Err(err(join_status(&code), format!("cannot join the room ({code}): {message}")));
                }
                _ => {}
            }
        }
        if signal.close_requested().is_some() {
            return Err(err(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down; try again in a moment"));
        }
        if tokio::time::timeout_at(deadline, signal.wake.notified()).await.is_err() {
            return Err(err(
                StatusCode::SERVICE_UNAVAILABLE,
                "the room store did not answer the join in time; try again",
            ));
        }
    }
}

async fn publish(
    state: &Arc<AppState>,
    room: &str,
    q: WhipQuery,
    addr: SocketAddr,
    headers: &HeaderMap,
    sdp: String,
) -> Result<Response, HttpError> {
    let handle = sfu(state)?;
    check_content_type(headers, SDP)?;
    check_room(room)?;
    let bearer = bearer(headers)?;
    check_offer(&sdp)?;
    let name = q.name.unwrap_or_else(|| DEFAULT_NAME.to_owned());
    let mut join = Join::new(room, name.as_str());
    join.sfu = true;
    match (&state.cfg.auth_secret, &bearer) {
        (Some(_), None) => return Err(err(
            StatusCode::UNAUTHORIZED,
            "this server needs a Bearer token: a join token that may publish (webcall token --room ROOM --name NAME)",
        )),
        // The auth secret itself admits as a token minted for this room would.
        (Some(secret), Some(b)) if constant_eq(secret, b) => {
            join.token =
                Some(crate::access::mint_token(secret, room, Some(&name), Duration::from_secs(60), true).into());
        }
        (Some(_), Some(b)) => join.token = Some(b.as_str().into()),
        (None, Some(b)) => join.password = Some(b.as_str().into()),
        (None, None) => {}
    }
    let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let signal = Arc::new(ConnSignal::default());
    let ip = crate::access::client_ip(
        addr.ip(),
        headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()),
        &state.cfg.trusted_proxies,
    );
    state.policy.register(conn, ip);
    state.router.connect_sfu_only(conn, signal.clone());
    state.router.message(conn, &join.to_json());
    let leave = |state: &AppState| {
        state.router.message(conn, BYE);
        state.router.disconnect(conn);
        state.policy.unregister(conn);
    };
    let (peer, ice) = match await_welcome(state, conn, &signal).await {
        Ok(w) => w,
        Err(e) => {
            leave(state);
            return Err(e);
        }
    };
    let started = async {
        let (session, signals) =
            handle.add_session_with(room, &peer, SessionRole::Publisher).await.map_err(sfu_refusal)?;
        match handle.offer(session, sdp.clone()).await {
            Ok(Some(answer)) => Ok((session, signals, answer)),
            Ok(None) => Err(err(StatusCode::INTERNAL_SERVER_ERROR, "the SFU had an offer outstanding")),
            Err(e) => {
                let _ = handle.remove(session);
                Err(sfu_refusal(e))
            }
        }
    };
    let (session, signals, answer) = match started.await {
        Ok(s) => s,
        Err(e) => {
            leave(state);
            return Err(e);
        }
    };
    let id = random_id(24);
    let res = Resource::new(Kind::Whip, room, session, bearer, sdp);
    let etag = res.etag.lock().clone();
    state.whip.map.lock().insert(id.clone(), res.clone());
    tracing::info!(room, peer, "WHIP publisher joined");
    tokio::spawn(run_publisher(state.clone(), id.clone(), res, handle, conn, signal, signals));
    Ok(created(Kind::Whip, room, &id, &etag, answer, &ice))
}

/// Keeps a WHIP publisher's room connection drained until DELETE, the media session's death or the server's
/// shutdown; then it leaves the room (the others get `bye`).
async fn run_publisher(
    state: Arc<AppState>,
    id: String,
    res: Arc<Resource>,
    handle: SfuHandle,
    conn: ConnId,
    signal: Arc<ConnSignal>,
    mut signals: mpsc::UnboundedReceiver<SessionSignal>,
) {
    let mut frames = Vec::new();
    loop {
        tokio::select! {
            _ = signal.wake.notified() => {
                // hello/bye of the others: nothing for a WHIP client to do with them.
                frames.clear();
                state.router.take(conn, &mut frames);
                if signal.close_requested().is_some() {
                    break;
                }
            }
            s = signals.recv() => match s {
                None | Some(SessionSignal::Closed) => break,
                Some(_) => {}
            },
            _ = res.end.notified() => break,
        }
    }
    let _ = handle.remove(res.session);
    state.router.message(conn, BYE);
    state.router.disconnect(conn);
    state.policy.unregister(conn);
    tracing::info!(room = res.room, "WHIP publisher left");
    linger(&state, &id, &res).await;
}

async fn watch(
    state: &Arc<AppState>,
    room: &str,
    q: WhepQuery,
    headers: &HeaderMap,
    sdp: String,
) -> Result<Response, HttpError> {
    let handle = sfu(state)?;
    check_content_type(headers, SDP)?;
    check_room(room)?;
    let bearer = bearer(headers)?;
    check_offer(&sdp)?;
    let id = random_id(24);
    let viewer = format!("whep-{id}");
    let password = match (&state.cfg.auth_secret, &bearer) {
        (Some(_), None) => return Err(err(
            StatusCode::UNAUTHORIZED,
            "this server needs a Bearer token: a join token for this room (webcall token --room ROOM --subscribe-only)",
        )),
        (Some(secret), Some(b)) => {
            if !constant_eq(secret, b) {
                crate::access::verify_token(secret, Some(b), room)
                    .map_err(|e| err(StatusCode::UNAUTHORIZED, e.message.clone()))?;
            }
            None
        }
        (None, b) => b.as_deref(),
    };
    let ice = state.router.admit_viewer(room, password, &viewer).map_err(|e| match e {
        WatchRefusal::NoRoom => err(StatusCode::NOT_FOUND, format!("no call in room '{room}' right now; watch once it has started")),
        WatchRefusal::NotSfu => err(
            StatusCode::CONFLICT,
            format!("room '{room}' is peer-to-peer: its media does not pass the server; it can be watched once it moves to the SFU"),
        ),
        WatchRefusal::Refused(e) => err(join_status(e.code.as_str()), e.message.clone()),
    })?;
    let source = q.peer.filter(|p| !p.is_empty()).map(|p| Arc::<str>::from(p.as_str()));
    let (session, signals) =
        handle.add_session_with(room, &viewer, SessionRole::Viewer { source }).await.map_err(sfu_refusal)?;
    let answer = match handle.offer(session, sdp.clone()).await {
        Ok(Some(a)) => a,
        Ok(None) => return Err(err(StatusCode::INTERNAL_SERVER_ERROR, "the SFU had an offer outstanding")),
        Err(e) => {
            let _ = handle.remove(session);
            return Err(sfu_refusal(e));
        }
    };
    let res = Resource::new(Kind::Whep, room, session, bearer, sdp);
    let etag = res.etag.lock().clone();
    state.whip.map.lock().insert(id.clone(), res.clone());
    tokio::spawn(run_viewer(state.clone(), id.clone(), res, handle, signals));
    Ok(created(Kind::Whep, room, &id, &etag, answer, &ice))
}

async fn run_viewer(
    state: Arc<AppState>,
    id: String,
    res: Arc<Resource>,
    handle: SfuHandle,
    mut signals: mpsc::UnboundedReceiver<SessionSignal>,
) {
    loop {
        tokio::select! {
            s = signals.recv() => match s {
                None | Some(SessionSignal::Closed) => break,
                Some(_) => {}
            },
            _ = res.end.notified() => break,
        }
    }
    let _ = handle.remove(res.session);
    linger(&state, &id, &res).await;
}

pub(crate) fn constant_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn resource(
    state: &AppState,
    kind: Kind,
    room: &str,
    id: &str,
    headers: &HeaderMap,
) -> Result<Arc<Resource>, HttpError> {
    let res = state.whip.map.lock().get(id).cloned();
    let res = res.filter(|r| r.kind == kind && r.room == room).ok_or_else(|| {
        err(
            StatusCode::NOT_FOUND,
            format!("no such {} session (it ended, or the URL is wrong)", kind.path().to_uppercase()),
        )
    })?;
    if let Some(want) = &res.bearer {
        match bearer(headers)? {
            Some(b) if constant_eq(want, &b) => {}
            _ => return Err(err(StatusCode::UNAUTHORIZED, "send the Bearer token this session was created with")),
        }
    }
    Ok(res)
}

pub(crate) async fn whip_delete(
    State(state): State<Arc<AppState>>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    end(&state, Kind::Whip, &room, &id, &headers)
}

pub(crate) async fn whep_delete(
    State(state): State<Arc<AppState>>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    end(&state, Kind::Whep, &room, &id, &headers)
}

fn end(state: &AppState, kind: Kind, room: &str, id: &str, headers: &HeaderMap) -> Response {
    let r = resource(state, kind, room, id, headers).map(|res| {
        state.whip.map.lock().remove(id);
        res.end.notify_one();
        StatusCode::OK
    });
    with_cors(state, headers, r)
}

pub(crate) async fn whip_patch(
    State(state): State<Arc<AppState>>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let r = patch(&state, Kind::Whip, &room, &id, &headers, &body).await;
    with_cors(&state, &headers, r)
}

pub(crate) async fn whep_patch(
    State(state): State<Arc<AppState>>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let r = patch(&state, Kind::Whep, &room, &id, &headers, &body).await;
    with_cors(&state, &headers, r)
}

/// What a trickle-ice-sdpfrag (RFC 8840) carries that matters here.
#[derive(Debug, Default, PartialEq, Eq)]
struct Fragment {
    ufrag: Option<String>,
    pwd: Option<String>,
    /// `candidate:…` (without `a=`).
    candidates: Vec<String>,
}

fn parse_fragment(body: &str) -> Fragment {
    let mut f = Fragment::default();
    for line in body.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
            f.ufrag = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("a=ice-pwd:") {
            f.pwd = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("a=") {
            if v.starts_with("candidate:") {
                f.candidates.push(v.to_owned());
            }
        }
    }
    f
}

/// The client's earlier offer with new ICE credentials and without its old candidates: the offer of an ICE
/// restart that WHIP sends only as a fragment.
fn restart_offer(old: &str, ufrag: &str, pwd: &str) -> String {
    let mut out = String::with_capacity(old.len());
    for line in old.split_inclusive('\n') {
        let l = line.trim_end();
        if l.starts_with("a=ice-ufrag:") {
            out.push_str(&format!("a=ice-ufrag:{ufrag}\r\n"));
        } else if l.starts_with("a=ice-pwd:") {
            out.push_str(&format!("a=ice-pwd:{pwd}\r\n"));
        } else if !l.starts_with("a=candidate:") && !l.starts_with("a=end-of-candidates") {
            out.push_str(line);
        }
    }
    out
}

async fn patch(
    state: &AppState,
    kind: Kind,
    room: &str,
    id: &str,
    headers: &HeaderMap,
    body: &str,
) -> Result<Response, HttpError> {
    let handle = sfu(state)?;
    let res = resource(state, kind, room, id, headers)?;
    if res.ended.load(Ordering::Relaxed) {
        return Err(err(
            StatusCode::NOT_FOUND,
            "this session has ended (its peer connection closed); POST a new offer",
        ));
    }
    check_content_type(headers, SDPFRAG)?;
    let if_match = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()).map(str::trim);
    let frag = parse_fragment(body);
    if if_match == Some("*") {
        let (Some(ufrag), Some(pwd)) = (&frag.ufrag, &frag.pwd) else {
            return Err(err(StatusCode::BAD_REQUEST, "an ICE restart (If-Match: *) needs a=ice-ufrag and a=ice-pwd"));
        };
        let offer = restart_offer(&res.offer.lock(), ufrag, pwd);
        let answer = match handle.offer(res.session, offer.clone()).await {
            Ok(Some(a)) => a,
            Ok(None) => return Err(err(StatusCode::CONFLICT, "the SFU is renegotiating this session; try again")),
            Err(e) => return Err(sfu_refusal(e)),
        };
        *res.offer.lock() = offer;
        for c in frag.candidates {
            let _ = handle.candidate(res.session, c);
        }
        let mut out = String::new();
        let mut seen = std::collections::HashSet::new();
        for l in answer.lines().map(str::trim_end) {
            let keep = l.starts_with("a=ice-ufrag:") || l.starts_with("a=ice-pwd:") || l.starts_with("a=candidate:");
            if keep && seen.insert(l.to_owned()) {
                out.push_str(l);
                out.push_str("\r\n");
            }
        }
        let etag = random_id(12);
        *res.etag.lock() = etag.clone();
        let mut r = (StatusCode::OK, out).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(SDPFRAG));
        if let Ok(e) = HeaderValue::from_str(&format!("\"{etag}\"")) {
            r.headers_mut().insert(header::ETAG, e);
        }
        return Ok(r);
    }
    if let Some(m) = if_match {
        let etag = res.etag.lock().clone();
        if m.trim_matches('"') != etag {
            return Err(err(
                StatusCode::PRECONDITION_FAILED,
                "If-Match does not name this session's current ETag (an ICE restart changed it); restart ICE",
            ));
        }
    }
    for c in frag.candidates {
        handle.candidate(res.session, c).map_err(sfu_refusal)?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_and_restart_offers() {
        let f = parse_fragment(
            "a=ice-ufrag:u2\r\na=ice-pwd:p2\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n\
             a=candidate:1 1 udp 1 127.0.0.1 5000 typ host\r\na=end-of-candidates\r\n",
        );
        assert_eq!(f.ufrag.as_deref(), Some("u2"));
        assert_eq!(f.pwd.as_deref(), Some("p2"));
        assert_eq!(f.candidates, vec!["candidate:1 1 udp 1 127.0.0.1 5000 typ host"]);
        let old = "v=0\r\nm=audio 9 X 111\r\na=ice-ufrag:u1\r\na=ice-pwd:p1\r\na=candidate:9 1 udp 1 10.0.0.1 1 typ host\r\na=mid:0\r\n";
        assert_eq!(
            restart_offer(old, "u2", "p2"),
            "v=0\r\nm=audio 9 X 111\r\na=ice-ufrag:u2\r\na=ice-pwd:p2\r\na=mid:0\r\n"
        );
    }

    #[test]
    fn ice_servers_become_link_headers() {
        let ice = vec![IceServer {
            urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
            username: Some("123:ab".into()),
            credential: Some("c\"x".into()),
        }];
        let l = links(&ice);
        assert_eq!(
            l[0].to_str().unwrap(),
            "<turn:127.0.0.1:3478?transport=udp>; rel=\"ice-server\"; username=\"123:ab\"; credential=\"cx\"; credential-type=\"password\""
        );
    }
}
