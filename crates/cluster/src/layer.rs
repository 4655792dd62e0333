//! Cluster mode: the same core on every node, with cluster-wide facts decided elsewhere (see `docs/cluster.md`).
//!
//! [`ClusterRooms`] is a layer around the single-node core ([`RoomCore`]), sans-IO like it and built on the core's
//! public API alone (its part for layers: [`Rooms::member`], [`Rooms::seat_detached`], [`Rooms::hand_off`], …). A `join` is not decided by the core:
//! the layer runs the local checks (policy, this node's room limit) and emits [`ClusterOutput::Join`]; the
//! adapter takes a seat cluster-wide and answers with [`ClusterRooms::admit`] or [`ClusterRooms::refuse_join`].
//! Peers of a room that live on other nodes are the core's *remote* members: they appear in `welcome` and can be
//! addressed; the core passes their frames on ([`Output::Forward`]), which leave here as [`ClusterOutput::Relay`],
//! and the end of a session of this node ([`Output::Left`]) as [`ClusterOutput::Left`]. Joins and leaves on
//! other nodes come in as [`ClusterRooms::remote_join`] / [`ClusterRooms::remote_leave`], their frames as
//! [`ClusterRooms::remote_deliver`]. A session resumed on another node is handed over with
//! [`ClusterRooms::take_over`] (old node) and [`ClusterRooms::handover`] (new node), so its queue keeps its order.
//! Every output, the cluster's too, leaves through [`ClusterRooms::poll_output`], in order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use webcall_protocol::{encode_topology_sfu_restart, ErrorCode, Join, PeerInfo, ProtocolError};
use webcall_rooms::{
    Admission, Config, ConnId, Frame, IceProvider, JoinPolicy, Output, RecordGrant, RecordRefusal, RoomCore, Rooms,
    Seat,
};

/// What the cluster adapter must do ([`Output::Layer`] of [`ClusterRooms::poll_output`]); only [`ClusterRooms`]
/// emits these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterOutput {
    /// Take a seat (or resume a session) cluster-wide, then call [`ClusterRooms::admit`] or
    /// [`ClusterRooms::refuse_join`].
    Join {
        conn: ConnId,
        room: String,
        name: String,
        password: Option<String>,
        resume: Option<String>,
        publish: bool,
        /// The join policy refused this join: only a resume may proceed; a fresh join is refused with this.
        refused: Option<ProtocolError>,
        /// The client speaks SFU (`"sfu":true`): the cluster decides the room's topology with it.
        sfu: bool,
    },
    /// Deliver `frame` to peer `to`, which lives on another node.
    Relay { to: Arc<str>, frame: Frame },
    /// A session of this node ended (bye, grace over, overflow): free its seat and tell the other nodes.
    Left { id: Arc<str>, room: Arc<str> },
}

/// A session of this node, as [`ClusterRooms::local_sessions`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSession {
    pub id: Arc<str>,
    pub room: Arc<str>,
    pub name: Arc<str>,
    pub token: Arc<str>,
    pub publish: bool,
    /// Joined with `"sfu":true`.
    pub sfu: bool,
}

/// How a join was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitKind {
    /// A new session.
    Fresh,
    /// The resume token named a session of this node.
    Resumed,
    /// The resume token named a session of another node; its queue comes with [`ClusterRooms::handover`].
    ResumedFromElsewhere,
}

/// The cluster's answer to a [`ClusterOutput::Join`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub conn: ConnId,
    pub kind: AdmitKind,
    pub id: String,
    pub token: String,
    pub room: String,
    pub name: String,
    pub publish: bool,
    /// The room's other members when the seat was taken, in join order.
    pub peers: Vec<PeerInfo>,
    /// The peer joined with `"sfu":true`.
    pub sfu: bool,
    /// The room's media goes through an SFU (decided cluster-wide, by the join).
    pub sfu_room: bool,
}

/// A cluster node's room core: the single-node core ([`Rooms`]: the driver reaches it through `BorrowMut`, the
/// layer through the explicit delegations below) with the cluster's inputs and outputs around it (its own
/// [`ClusterRooms::message`] and [`ClusterRooms::poll_output`] come first).
pub struct ClusterRooms {
    core: Rooms,
    /// The layer's output channel: the core's outputs, translated, with the layer's own in order between them.
    out: VecDeque<Output<ClusterOutput>>,
    /// Connections with a join out for cluster-wide admission (or waiting for a hand-over).
    joining: HashSet<ConnId>,
    /// Sessions resumed here from another node: the connection that gets its welcome when the old node's queue
    /// arrives.
    awaiting: HashMap<Arc<str>, ConnId>,
}

impl std::borrow::Borrow<Rooms> for ClusterRooms {
    fn borrow(&self) -> &Rooms {
        &self.core
    }
}

impl std::borrow::BorrowMut<Rooms> for ClusterRooms {
    fn borrow_mut(&mut self) -> &mut Rooms {
        &mut self.core
    }
}

/// The core's queries and inputs the cluster layer and its driver use, delegated explicitly (no `Deref`: a core
/// method the layer does not forward here is not reachable through it by accident).
impl ClusterRooms {
    /// See [`Rooms::stats`].
    pub fn stats(&self) -> webcall_rooms::Stats {
        self.core.stats()
    }

    /// See [`Rooms::tick`].
    pub fn tick(&mut self, now: Instant) {
        self.core.tick(now)
    }

    /// See [`Rooms::peer_of`].
    pub fn peer_of(&self, conn: ConnId) -> Option<&str> {
        self.core.peer_of(conn)
    }

    /// See [`Rooms::sfu_frame`].
    pub fn sfu_frame(&mut self, peer: &str, frame: Frame) -> bool {
        self.core.sfu_frame(peer, frame)
    }

    /// See [`Rooms::room_is_sfu`].
    pub fn room_is_sfu(&self, room: &str) -> bool {
        self.core.room_is_sfu(room)
    }

    /// See [`Rooms::is_recording`].
    pub fn is_recording(&self, room: &str) -> bool {
        self.core.is_recording(room)
    }
}

impl RoomCore for ClusterRooms {
    type Extra = ClusterOutput;
    fn message(&mut self, conn: ConnId, text: &str, now: Instant) {
        ClusterRooms::message(self, conn, text, now)
    }
    fn disconnect(&mut self, conn: ConnId, now: Instant) {
        ClusterRooms::disconnect(self, conn, now)
    }
    fn poll_output(&mut self) -> Option<Output<ClusterOutput>> {
        ClusterRooms::poll_output(self)
    }
}

impl ClusterRooms {
    /// `now`: as for [`Rooms::new`].
    pub fn new(cfg: Config, ice: Box<dyn IceProvider>, now: Instant) -> Self {
        ClusterRooms {
            core: Rooms::new(cfg, ice, now),
            out: VecDeque::new(),
            joining: HashSet::default(),
            awaiting: HashMap::new(),
        }
    }

    /// One text frame from a connection: a `join` goes to the cluster, everything else to the core.
    pub fn message(&mut self, conn: ConnId, text: &str, now: Instant) {
        if let Some(j) = self.core.read(conn, text, now) {
            self.join(conn, j, now);
        }
    }

    /// The one output channel: the core's, with remote members' frames and this node's leaves for the cluster.
    pub fn poll_output(&mut self) -> Option<Output<ClusterOutput>> {
        if let Some(o) = self.out.pop_front() {
            return Some(o);
        }
        let o = self.core.poll_output()?;
        Some(self.translate(o))
    }

    fn translate(&mut self, o: Output) -> Output<ClusterOutput> {
        match o {
            Output::Forward { to, frame } => Output::Layer(ClusterOutput::Relay { to, frame }),
            Output::Left { id, room } => {
                self.awaiting.remove(&id);
                Output::Layer(ClusterOutput::Left { id, room })
            }
            o => o.widen(),
        }
    }

    /// The connection is gone ([`Rooms::disconnect`]).
    pub fn disconnect(&mut self, conn: ConnId, now: Instant) {
        self.joining.remove(&conn);
        self.core.disconnect(conn, now);
    }

    /// Puts out one of the layer's own, behind what the core put out before.
    fn emit(&mut self, o: ClusterOutput) {
        while let Some(c) = self.core.poll_output() {
            let c = self.translate(c);
            self.out.push_back(c);
        }
        self.out.push_back(Output::Layer(o));
    }

    /// A join that passed the core's checks: local checks, then off to the cluster.
    fn join(&mut self, conn: ConnId, j: Join<'_>, now: Instant) {
        if !self.core.may_join(conn, now) {
            return;
        }
        if self.joining.contains(&conn) {
            let e = ProtocolError::new(ErrorCode::AlreadyJoined, "a join is already under way; wait for its welcome");
            return self.core.refuse(conn, e.refers_to("join"), now);
        }
        // Resumes skip the policy as on one node, but whether a token is good is only known cluster-wide: the
        // verdict travels with the join and counts only if it turns out fresh.
        let (admission, refused) = match self.core.check_policy(conn, &j) {
            Ok(a) => (a, None),
            Err(e) if j.resume.is_none() => return self.core.refuse(conn, e.refers_to("join"), now),
            Err(e) => (Admission::default(), Some(e)),
        };
        if !self.core.has_room_for(&j.room) {
            let e = ProtocolError::new(ErrorCode::ServerFull, "this server has no room for another room; try later");
            return self.core.refuse(conn, e.refers_to("join"), now);
        }
        let name = admission.name.clone().unwrap_or_else(|| j.name.to_string());
        self.joining.insert(conn);
        self.emit(ClusterOutput::Join {
            conn,
            room: j.room.to_string(),
            name,
            password: j.password.as_deref().map(str::to_owned),
            resume: j.resume.as_deref().map(str::to_owned),
            publish: admission.publish,
            refused,
            sfu: j.sfu,
        });
    }

    /// Replaces the default [`webcall_rooms::OpenPolicy`].
    pub fn with_policy(mut self, policy: Box<dyn JoinPolicy>) -> Self {
        self.core = self.core.with_policy(policy);
        self
    }

    /// Recording stays single-node: with --redis it is always refused (shadows [`Rooms::set_recording`]).
    pub fn set_recording(
        &mut self,
        _room: &str,
        _start: bool,
        _by: &str,
        _now: Instant,
    ) -> Result<bool, RecordRefusal> {
        Err(RecordRefusal::Clustered)
    }

    /// The cluster refused a [`ClusterOutput::Join`] (room full, backend unavailable, …).
    pub fn refuse_join(&mut self, conn: ConnId, e: ProtocolError, now: Instant) {
        self.core.set_now(now);
        // A closing connection reads nothing more: whether it was joining no longer matters.
        if !self.joining.remove(&conn) || !self.core.accepting(conn) {
            return;
        }
        self.core.refuse(conn, e.refers_to("join"), now);
    }

    /// Makes the room's remote members match `peers` (the cluster's view when the seat was taken), telling local
    /// members about differences as joins and leaves.
    fn sync_room(&mut self, room: &str, peers: &[PeerInfo], except: &str) {
        let gone: Vec<Arc<str>> = self
            .core
            .room_members(room)
            .filter(|m| m.remote && **m.id != *except && !peers.iter().any(|p| *p.id == **m.id))
            .map(|m| m.id.clone())
            .collect();
        for id in gone {
            self.core.remove_remote_member(&id);
        }
        for p in peers {
            if p.id != except && self.core.member(&p.id).is_none() {
                self.add_remote(room, &p.id, &p.name);
            }
        }
    }

    fn add_remote(&mut self, room: &str, id: &str, name: &str) {
        self.core.add_remote_member(room, id, name);
        self.core.announce_join(id);
    }

    /// The cluster admitted a join this node asked for.
    pub fn admit(&mut self, a: Admitted, now: Instant) {
        self.core.set_now(now);
        let live = self.joining.remove(&a.conn) && self.core.accepting(a.conn);
        let conn = live.then_some(a.conn);
        self.sync_room(&a.room, &a.peers, &a.id);
        let id: Arc<str> = Arc::from(a.id.as_str());
        match a.kind {
            AdmitKind::Resumed if self.is_local(&id) => {
                self.core.counters_mut().resumes += 1;
                self.sfu_room(&a.room, &id, a.sfu_room);
                self.core.resume_local(conn, &id, a.token.into());
            }
            AdmitKind::Resumed | AdmitKind::ResumedFromElsewhere => {
                // Wait for the old node's queue; meanwhile frames for the peer queue here, behind it.
                self.ensure_local(&a, &id, now);
                self.sfu_room(&a.room, &id, a.sfu_room);
                match conn {
                    Some(conn) => {
                        self.awaiting.insert(id.clone(), conn);
                        self.joining.insert(conn);
                    }
                    None => {
                        self.awaiting.remove(&id);
                    }
                }
            }
            AdmitKind::Fresh => {
                self.core.counters_mut().joins += 1;
                self.ensure_local(&a, &id, now);
                // As on one node: the members there hear `topology` before the newcomer's `hello`.
                self.sfu_room(&a.room, &id, a.sfu_room);
                if let Some(conn) = conn {
                    // Cannot fail: the connection was free when it asked to join, and joins no other room meanwhile.
                    let attached = self.core.attach(conn, &id, false, Vec::new());
                    debug_assert!(attached);
                }
                self.core.announce_join(&id);
            }
        }
    }

    /// Makes `id` a detached local session of `a.room` (grace period running).
    fn ensure_local(&mut self, a: &Admitted, id: &str, now: Instant) {
        let seat = Seat {
            room: &a.room,
            id,
            name: &a.name,
            token: Arc::from(a.token.as_str()),
            publish: a.publish,
            sfu: a.sfu,
            // Recording stays single-node: every session of a cluster node hears why it may not.
            record: RecordGrant::Clustered,
        };
        self.core.seat_detached(seat, now);
    }

    /// `room` is an SFU room (`sfu`): if it was not, its local members but `except` hear `topology`.
    fn sfu_room(&mut self, room: &str, except: &str, sfu: bool) {
        if sfu {
            self.core.switch_to_sfu(room, except);
        }
    }

    /// The cluster moved `room` to the SFU (a join on another node), or, with `restart`, moved its SFU to another
    /// node (the old one died): the local members are told, the latter with `topology` `restart`, so that they
    /// connect to the new one. Ignored when no session of this node is in that room.
    pub fn remote_topology(&mut self, room: &str, restart: bool, now: Instant) {
        self.core.set_now(now);
        if !self.core.has_local_members(room) {
            return;
        }
        if !self.core.room_is_sfu(room) {
            self.core.switch_to_sfu(room, "");
        } else if restart {
            self.core.broadcast_local(room, "", Arc::from(encode_topology_sfu_restart()));
        }
    }

    /// Peer `id` joined `room` on another node. Ignored when no session of this node is in that room.
    pub fn remote_join(&mut self, room: &str, id: &str, name: &str, now: Instant) {
        self.core.set_now(now);
        if self.core.member(id).is_some() || !self.core.has_local_members(room) {
            return;
        }
        self.add_remote(room, id, name);
    }

    /// Remote peer `id` left its room: the local members get `bye`.
    pub fn remote_leave(&mut self, id: &str, now: Instant) {
        self.core.set_now(now);
        self.core.remove_remote_member(id);
    }

    /// A frame from another node for local peer `to`. `false`: no such local session.
    pub fn remote_deliver(&mut self, to: &str, frame: Frame, now: Instant) -> bool {
        self.core.set_now(now);
        self.core.deliver_local(to, frame)
    }

    /// Local session `id` was resumed on another node: it becomes a remote member here, its open connection (if
    /// any) is closed as on a local resume, and everything it had not been sent is returned, in order, for the new
    /// node.
    pub fn take_over(&mut self, id: &str, now: Instant) -> Vec<Frame> {
        self.core.set_now(now);
        if !self.is_local(id) {
            return Vec::new();
        }
        let awaiting = self.awaiting.remove(id);
        let frames = self.core.hand_off(id).unwrap_or_default();
        if let Some(waiting) = awaiting {
            self.refuse_join(
                waiting,
                ProtocolError::new(ErrorCode::AlreadyJoined, "this session was resumed elsewhere"),
                now,
            );
        }
        frames
    }

    /// The old node's queue for a session resumed here (empty if the old node could not send it in time): the
    /// waiting connection gets its welcome, these frames, then what queued here since.
    pub fn handover(&mut self, id: &str, frames: Vec<Frame>, now: Instant) {
        self.core.set_now(now);
        if !self.is_local(id) {
            return;
        }
        let Some(conn) = self.awaiting.remove(id) else { return };
        self.core.counters_mut().resumes += 1;
        if !self.joining.contains(&conn) || !self.core.accepting(conn) {
            return self.core.prepend_pending(id, frames);
        }
        if !self.core.attach(conn, id, true, frames.clone()) {
            // Resumed again meanwhile, on another connection of this node: that one has the session (and gets
            // the frames), this one hears why not.
            self.core.prepend_pending(id, frames);
            let e = ProtocolError::new(ErrorCode::AlreadyJoined, "this session was resumed on another connection");
            return self.refuse_join(conn, e, now);
        }
        self.joining.remove(&conn);
    }

    /// This node's sessions, for re-asserting them after the cluster store lost them (Redis restarted empty or
    /// failed over to a replica that was behind).
    pub fn local_sessions(&self) -> Vec<LocalSession> {
        self.core
            .members()
            .filter(|m| !m.remote)
            .map(|m| LocalSession {
                id: m.id.clone(),
                room: m.room.clone(),
                name: m.name.clone(),
                token: m.token.clone(),
                publish: m.publish,
                sfu: m.sfu,
            })
            .collect()
    }

    /// The cluster's membership of `room` (after a blip, when joins and leaves may have been missed): the local
    /// members hear the differences as `hello` and `bye`. Ignored when no session of this node is in the room.
    pub fn sync_remote(&mut self, room: &str, peers: &[PeerInfo], now: Instant) {
        self.core.set_now(now);
        if self.core.has_local_members(room) {
            self.sync_room(room, peers, "");
        }
    }

    /// The members of `room` that live on other nodes.
    pub fn remote_members(&self, room: &str) -> Vec<PeerInfo> {
        self.core
            .room_members(room)
            .filter(|m| m.remote)
            .map(|m| PeerInfo { id: m.id.to_string(), name: m.name.to_string() })
            .collect()
    }

    /// How many more frames local peer `id`'s connection takes before it counts as a slow reader (`None`: no such
    /// connected session). The adapter paces bursts from other nodes (a replay after a blip) with it.
    pub fn queue_room(&self, id: &str) -> Option<usize> {
        self.core.queue_room(id)
    }

    /// Whether `id` is a session of this node.
    pub fn is_local(&self, id: &str) -> bool {
        self.core.member(id).is_some_and(|m| !m.remote)
    }

    /// Whether `id` is known here as a member on another node.
    pub fn is_remote(&self, id: &str) -> bool {
        self.core.member(id).is_some_and(|m| m.remote)
    }

    /// A relay from local peer `from` could not be accepted for another node: its client gets `e`.
    pub fn relay_refused(&mut self, from: &str, e: ProtocolError, now: Instant) {
        self.core.relay_refused(from, e, now)
    }

    /// Sessions waiting for a handover, for the adapter's timeout.
    pub fn awaiting_handover(&self) -> impl Iterator<Item = &str> {
        self.awaiting.keys().filter(|k| self.is_local(k)).map(|k| &**k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;
    use webcall_protocol::{Signal, BYE, SFU_PEER};
    use webcall_rooms::harness::Harness;
    use webcall_rooms::{close, SfuRequest, Stats};

    /// One node of a simulated cluster, driven by hand.
    type Node = Harness<ClusterRooms>;

    fn node() -> Node {
        let cfg = Config { max_peers: 3, resume_grace: Duration::from_secs(5), ..Config::default() };
        let now = Instant::now();
        Harness::over(ClusterRooms::new(cfg, Box::new(|_: &str| Vec::new()), now), now)
    }

    trait NodeExt {
        fn cluster(&mut self) -> Vec<ClusterOutput>;
        fn join(&mut self, room: &str, id: &str, peers: &[(&str, &str)]) -> ConnId;
    }

    impl NodeExt for Node {
        fn cluster(&mut self) -> Vec<ClusterOutput> {
            self.split(|o| matches!(o, Output::Layer(_)))
                .into_iter()
                .filter_map(|o| match o {
                    Output::Layer(c) => Some(c),
                    _ => None,
                })
                .collect()
        }
        /// Joins through the (simulated) cluster: returns the conn after its welcome.
        fn join(&mut self, room: &str, id: &str, peers: &[(&str, &str)]) -> ConnId {
            let c = self.connect();
            self.send(c, &Join::new(room, id).to_json());
            let out = self.cluster();
            assert!(matches!(&out[..], [ClusterOutput::Join { conn, .. }] if *conn == c), "{out:?}");
            let now = self.now;
            self.rooms.admit(admitted(c, AdmitKind::Fresh, id, room, peers), now);
            let w = self.recv(c);
            assert_eq!(w[0]["type"], "welcome");
            assert_eq!(w[0]["id"], id);
            c
        }
    }

    fn admitted(conn: ConnId, kind: AdmitKind, id: &str, room: &str, peers: &[(&str, &str)]) -> Admitted {
        Admitted {
            conn,
            kind,
            id: id.into(),
            token: format!("tok-{id}"),
            room: room.into(),
            name: id.into(),
            publish: true,
            peers: peers.iter().map(|(i, n)| PeerInfo { id: (*i).into(), name: (*n).into() }).collect(),
            sfu: false,
            sfu_room: false,
        }
    }

    #[test]
    fn recording_is_refused_with_redis() {
        let mut n = node();
        let c = n.join("r", "A", &[]);
        n.send(c, &webcall_protocol::ClientMessage::Record(webcall_protocol::RecordAction::Start).to_json());
        let e = n.recv(c).remove(0);
        assert_eq!((e["code"].as_str(), e["ref"].as_str()), (Some("unavailable"), Some("record")), "{e}");
        assert!(e["message"].as_str().unwrap().contains("--redis"), "{e}");
        // The API's way in is refused by the cluster layer too, and nothing is asked of the SFU.
        let now = n.now;
        assert_eq!(n.rooms.set_recording("r", true, "api", now), Err(RecordRefusal::Clustered));
        assert!(!n.rooms.is_recording("r"));
    }

    #[test]
    fn join_waits_for_the_cluster_and_welcome_lists_remote_peers() {
        let mut n = node();
        let c = n.connect();
        n.send(c, &Join::new("r", "Bob").to_json());
        assert!(n.recv(c).is_empty(), "no welcome before the seat is taken");
        let out = n.cluster();
        assert!(
            matches!(&out[..], [ClusterOutput::Join { room, name, resume: None, .. }] if room == "r" && name == "Bob")
        );
        n.send(c, &Join::new("r", "").to_json());
        assert_eq!(n.recv(c)[0]["code"], "already-joined");
        n.rooms.admit(admitted(c, AdmitKind::Fresh, "B", "r", &[("A", "Alice")]), n.now);
        let w = n.recv(c);
        assert_eq!(w[0]["peers"], json!([{"id":"A","name":"Alice"}]));
        assert_eq!(w[0]["resume"], "tok-B");
        // A relay to the remote peer leaves as a cluster output.
        n.send(c, &Signal::Offer("x".into()).to_json("A"));
        let out = n.cluster();
        assert!(
            matches!(&out[..], [ClusterOutput::Relay { to, frame }] if &**to == "A" && frame.contains(r#""from":"B""#))
        );
    }

    #[test]
    fn an_sfu_room_decided_by_the_cluster_spans_nodes() {
        let mut n = node();
        let a = n.join("r", "A", &[("B", "b")]);
        // C's join moved the room to the SFU (decided cluster-wide): A hears topology before C's hello.
        let c = n.connect();
        n.send(c, &Join { sfu: true, ..Join::new("r", "C") }.to_json());
        assert!(matches!(&n.cluster()[..], [ClusterOutput::Join { sfu: true, .. }]));
        let mut adm = admitted(c, AdmitKind::Fresh, "C", "r", &[("B", "b"), ("A", "A")]);
        (adm.sfu, adm.sfu_room) = (true, true);
        n.rooms.admit(adm, n.now);
        assert_eq!(
            n.recv(a),
            vec![json!({"type":"topology","mode":"sfu"}), json!({"type":"hello","from":"C","name":"C"})]
        );
        let got = n.recv(c);
        assert_eq!((got[0]["type"].as_str(), &got[1]), (Some("welcome"), &json!({"type":"topology","mode":"sfu"})));
        // `sfu` signaling goes to the SFU adapter (the cluster layer routes it to the room's SFU node).
        n.send(c, &Signal::Offer("v=0".into()).to_json(SFU_PEER));
        let out: Vec<Output<ClusterOutput>> =
            std::iter::from_fn(|| n.rooms.poll_output()).filter(|o| !matches!(o, Output::Wake(_))).collect();
        assert!(matches!(&out[..], [Output::Sfu(SfuRequest::Signal { peer, .. })] if &**peer == "C"), "{out:?}");
        // `data` reaches members on other nodes too.
        // Raw JSON: `data` carries any object.
        n.send(c, r#"{"type":"data","data":{"type":"chat","text":"hi"}}"#);
        assert_eq!(n.recv(a)[0]["from"], "C");
        assert!(matches!(&n.cluster()[..], [ClusterOutput::Relay { to, .. }] if &**to == "B"));
        // A member on another node leaving ends no media session here (its node ends it).
        n.rooms.remote_leave("B", n.now);
        let out: Vec<Output<ClusterOutput>> = std::iter::from_fn(|| n.rooms.poll_output()).collect();
        assert!(!out.iter().any(|o| matches!(o, Output::Sfu(_))), "{out:?}");
        n.recv(a);
        n.recv(c);
        // The SFU moved to another node: the members here make a new connection to it.
        n.rooms.remote_topology("r", true, n.now);
        let restart = json!({"type":"topology","mode":"sfu","restart":true});
        assert_eq!((n.recv(a), n.recv(c)), (vec![restart.clone()], vec![restart]));
    }

    #[test]
    fn refused_join_leaves_the_connection_usable() {
        let mut n = node();
        let c = n.connect();
        n.send(c, &Join::new("r", "").to_json());
        n.cluster();
        n.rooms.refuse_join(c, ProtocolError::new(ErrorCode::RoomFull, "full"), n.now);
        let e = n.recv(c);
        assert_eq!(e[0]["code"], "room-full");
        assert_eq!(e[0]["ref"], "join");
        n.send(c, &Join::new("s", "").to_json());
        assert_eq!(n.cluster().len(), 1);
    }

    #[test]
    fn remote_joins_and_leaves_reach_local_members_only_once() {
        let mut n = node();
        let a = n.join("r", "A", &[]);
        n.rooms.remote_join("r", "B", "Bob", n.now);
        n.rooms.remote_join("r", "B", "Bob", n.now);
        assert_eq!(n.recv(a), vec![json!({"type":"hello","from":"B","name":"Bob"})]);
        // Rooms with no local member are not tracked.
        n.rooms.remote_join("other", "C", "C", n.now);
        assert_eq!(n.rooms.stats().rooms, 1);
        n.rooms.remote_deliver("A", Arc::from(r#"{"type":"offer","from":"B","sdp":"x"}"#), n.now);
        assert_eq!(n.recv(a)[0]["type"], "offer");
        n.rooms.remote_leave("B", n.now);
        n.rooms.remote_leave("B", n.now);
        assert_eq!(n.recv(a), vec![json!({"type":"bye","from":"B"})]);
        assert!(n.cluster().is_empty(), "remote events are not echoed to the cluster");
    }

    #[test]
    fn local_leave_is_reported_and_forgets_remote_only_rooms() {
        let mut n = node();
        let a = n.join("r", "A", &[("X", "x")]);
        let b = n.join("r", "B", &[("X", "x"), ("A", "A")]);
        assert_eq!(n.recv(a), vec![json!({"type":"hello","from":"B","name":"B"})]);
        n.send(b, BYE);
        assert_eq!(n.recv(a), vec![json!({"type":"bye","from":"B"})]);
        let out = n.cluster();
        assert!(matches!(&out[..], [ClusterOutput::Left { id, .. }] if &**id == "B"));
        n.rooms.disconnect(a, n.now);
        n.now += Duration::from_secs(6);
        n.rooms.tick(n.now);
        assert!(matches!(&n.cluster()[..], [ClusterOutput::Left { id, .. }] if &**id == "A"));
        assert_eq!(n.rooms.stats(), Stats { connections: 1, rooms: 0, peers: 0, detached_peers: 0 });
    }

    #[test]
    fn welcome_snapshot_corrects_a_stale_view() {
        let mut n = node();
        let a = n.join("r", "A", &[("X", "x")]);
        // The cluster says X is gone and Y is there: A hears it as bye and hello.
        n.join("r", "B", &[("A", "A"), ("Y", "y")]);
        let got = n.recv(a);
        assert!(got.contains(&json!({"type":"bye","from":"X"})), "{got:?}");
        assert!(got.contains(&json!({"type":"hello","from":"Y","name":"y"})), "{got:?}");
        assert_eq!(got.last().unwrap(), &json!({"type":"hello","from":"B","name":"B"}));
    }

    #[test]
    fn resume_on_another_node_keeps_the_queue_in_order() {
        let (mut old, mut new) = (node(), node());
        let p = old.join("r", "P", &[("S", "s")]);
        old.rooms.disconnect(p, old.now);
        old.rooms.remote_deliver("P", Arc::from(r#"{"n":1}"#), old.now);
        // P resumes on `new`, which hears of it before the old node's queue arrives.
        let c = new.connect();
        new.send(c, &Join { resume: Some("tok-P".into()), ..Join::new("r", "") }.to_json());
        assert!(matches!(&new.cluster()[..], [ClusterOutput::Join { resume: Some(t), .. }] if t == "tok-P"));
        new.rooms.admit(admitted(c, AdmitKind::ResumedFromElsewhere, "P", "r", &[("S", "s")]), new.now);
        assert!(new.recv(c).is_empty(), "welcome waits for the handover");
        new.rooms.remote_deliver("P", Arc::from(r#"{"n":3}"#), new.now);
        old.rooms.remote_deliver("P", Arc::from(r#"{"n":2}"#), old.now);
        let frames = old.rooms.take_over("P", old.now);
        assert_eq!(frames.len(), 2);
        assert_eq!(old.rooms.stats().peers, 0, "the old node forgets a room it has no session in");
        assert!(old.cluster().is_empty(), "a hand-over is not a leave");
        assert_eq!(new.rooms.awaiting_handover().collect::<Vec<_>>(), vec!["P"]);
        new.rooms.handover("P", frames, new.now);
        let got = new.recv(c);
        assert_eq!(got[0]["type"], "welcome");
        assert_eq!(got[0]["resumed"], true);
        assert_eq!(got[0]["peers"], json!([{"id":"S","name":"s"}]));
        assert_eq!(&got[1..], &[json!({"n":1}), json!({"n":2}), json!({"n":3})]);
        // Its grace deadline no longer applies.
        new.now += Duration::from_secs(6);
        new.rooms.tick(new.now);
        assert_eq!(new.rooms.stats().peers, 2);
    }

    #[test]
    fn a_handover_for_a_session_resumed_again_meanwhile_goes_to_the_newer_connection() {
        let mut n = node();
        let c1 = n.connect();
        n.send(c1, &Join { resume: Some("tok-P".into()), ..Join::new("r", "") }.to_json());
        n.cluster();
        let now = n.now;
        n.rooms.admit(admitted(c1, AdmitKind::ResumedFromElsewhere, "P", "r", &[("S", "s")]), now);
        assert!(n.recv(c1).is_empty(), "welcome waits for the handover");
        // The client gives up on c1 and resumes again on c2, which this node now hosts.
        let c2 = n.connect();
        n.send(c2, &Join { resume: Some("tok-P".into()), ..Join::new("r", "") }.to_json());
        n.cluster();
        n.rooms.admit(admitted(c2, AdmitKind::Resumed, "P", "r", &[("S", "s")]), now);
        assert_eq!(n.recv(c2)[0]["type"], "welcome");
        // The old node's queue arrives: nothing of it is lost, and c1 hears why it gets no welcome.
        n.rooms.handover("P", vec![Arc::from(r#"{"n":1}"#)], now);
        assert_eq!(n.recv(c2), vec![json!({"n":1})]);
        let e = n.recv(c1);
        assert_eq!((e[0]["code"].as_str(), e[0]["ref"].as_str()), (Some("already-joined"), Some("join")), "{e:?}");
        assert_eq!(n.rooms.peer_of(c2), Some("P"));
        assert_eq!(n.rooms.peer_of(c1), None);
    }

    #[test]
    fn take_over_closes_a_still_open_old_connection() {
        let mut n = node();
        let p = n.join("r", "P", &[]);
        n.rooms.remote_join("r", "S", "s", n.now);
        n.recv(p);
        n.rooms.remote_deliver("P", Arc::from(r#"{"n":1}"#), n.now);
        let frames = n.rooms.take_over("P", n.now);
        assert_eq!(frames.len(), 1);
        let closes: Vec<Output<ClusterOutput>> =
            std::iter::from_fn(|| n.rooms.poll_output()).filter(|o| matches!(o, Output::Close { .. })).collect();
        assert_eq!(
            closes,
            vec![Output::Close { conn: p, code: close::RESUMED_ELSEWHERE, reason: "resumed elsewhere" }]
        );
    }

    #[test]
    fn resume_on_the_same_node() {
        let mut n = node();
        let a = n.join("r", "A", &[]);
        let b = n.join("r", "B", &[("A", "A")]);
        n.rooms.disconnect(b, n.now);
        n.send(a, &Signal::Offer("queued".into()).to_json("B"));
        let c = n.connect();
        n.send(c, &Join { resume: Some("tok-B".into()), ..Join::new("r", "") }.to_json());
        n.cluster();
        n.rooms.admit(admitted(c, AdmitKind::Resumed, "B", "r", &[("A", "A")]), n.now);
        let got = n.recv(c);
        assert_eq!(got[0]["resumed"], true);
        assert_eq!(got[0]["resume"], "tok-B");
        assert_eq!(got[1]["sdp"], "queued");
    }

    #[test]
    fn admitted_after_the_connection_dropped_is_a_detached_session() {
        let mut n = node();
        let a = n.join("r", "A", &[]);
        let c = n.connect();
        n.send(c, &Join::new("r", "").to_json());
        n.cluster();
        n.rooms.disconnect(c, n.now);
        assert!(n.rooms.joining.is_empty(), "a dropped connection's join leaves nothing behind");
        n.rooms.admit(admitted(c, AdmitKind::Fresh, "B", "r", &[("A", "A")]), n.now);
        assert_eq!(n.recv(a)[0]["type"], "hello");
        n.now += Duration::from_secs(6);
        n.rooms.tick(n.now);
        assert_eq!(n.recv(a), vec![json!({"type":"bye","from":"B"})]);
        assert!(matches!(&n.cluster()[..], [ClusterOutput::Left { id, .. }] if &**id == "B"));
    }
}
