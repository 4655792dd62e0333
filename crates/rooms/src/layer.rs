//! What a layer around the core ([`RoomCore`]) may do: admit joins its own way, and keep *remote* members (sessions
//! that live outside this core) in step with the world outside. The cluster's layer (`webcall_cluster::ClusterRooms`)
//! is built on these alone; nothing here is needed on a single node.

use super::*;

/// A session as a layer sees it ([`Rooms::member`], [`Rooms::members`], [`Rooms::room_members`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    pub id: &'a Arc<str>,
    pub room: &'a Arc<str>,
    pub name: &'a Arc<str>,
    /// Its resume token (empty for a remote member: its host has it).
    pub token: &'a Arc<str>,
    pub publish: bool,
    /// Joined with `"sfu":true`.
    pub sfu: bool,
    /// Lives outside this core.
    pub remote: bool,
}

impl<'a> Member<'a> {
    fn of(id: &'a Arc<str>, p: &'a Peer) -> Self {
        Member { id, room: &p.room, name: &p.name, token: &p.token, publish: p.publish, sfu: p.sfu, remote: p.remote }
    }
}

/// A local session a layer admitted itself ([`Rooms::seat_detached`]).
#[derive(Debug, Clone)]
pub struct Seat<'a> {
    pub room: &'a str,
    pub id: &'a str,
    pub name: &'a str,
    pub token: Arc<str>,
    pub publish: bool,
    pub sfu: bool,
    pub record: RecordGrant,
}

impl Rooms {
    /// The time of an input the layer handles itself: work it triggers in the core (a slow reader's grace period)
    /// counts from it.
    pub fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    /// The counters, for what the layer admits (joins, resumes).
    pub fn counters_mut(&mut self) -> &mut Counters {
        &mut self.counters
    }

    /// The join policy's verdict on `join` (the core's own joins ask it the same way).
    pub fn check_policy(&self, conn: ConnId, join: &Join<'_>) -> Result<Admission, ProtocolError> {
        self.policy.admit(conn, join)
    }

    /// Whether `room` exists here or another room still fits ([`Config::max_rooms`]).
    pub fn has_room_for(&self, room: &str) -> bool {
        self.rooms.contains_key(room) || self.rooms.len() < self.cfg.max_rooms
    }

    /// Session `id`, local or remote.
    pub fn member(&self, id: &str) -> Option<Member<'_>> {
        self.peers.get_key_value(id).map(|(id, p)| Member::of(id, p))
    }

    /// Every session, local and remote.
    pub fn members(&self) -> impl Iterator<Item = Member<'_>> {
        self.peers.iter().map(|(id, p)| Member::of(id, p))
    }

    /// The members of `room`, in join order.
    pub fn room_members(&self, room: &str) -> impl Iterator<Item = Member<'_>> {
        self.rooms.get(room).into_iter().flat_map(|r| r.members.iter()).map(|m| Member::of(m, &self.peers[m]))
    }

    /// Adds remote member `id` to `room` (made if needed), telling nobody (see [`Rooms::announce_join`]). Nothing
    /// happens if `id` is known already.
    pub fn add_remote_member(&mut self, room: &str, id: &str, name: &str) {
        if self.peers.contains_key(id) {
            return;
        }
        let room: Arc<str> = match self.rooms.get_key_value(room) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(room);
                self.rooms.insert(k.clone(), Room::new(None, 0.0, 0));
                k
            }
        };
        let id: Arc<str> = Arc::from(id);
        let peer = Peer {
            name: Arc::from(name),
            room: room.clone(),
            conn: None,
            token: Arc::from(""),
            pending: Queue::default(),
            epoch: 0,
            publish: true,
            remote: true,
            sfu: false,
            // A remote member sends nothing through this core: its grant is its host's business.
            record: RecordGrant::NotGranted,
        };
        self.peers.insert(id.clone(), peer);
        self.rooms.get_mut(&room).expect("just ensured").members.push(id);
    }

    /// The local members of `id`'s room (but `id`) hear its `hello`.
    pub fn announce_join(&mut self, id: &str) {
        let Some((id, p)) = self.peers.get_key_value(id) else { return };
        let (id, room, hello) = (id.clone(), p.room.clone(), encode_hello(id, &p.name));
        self.broadcast(&room, &id, Arc::from(hello));
    }

    /// Remote member `id` left: the local members hear `bye`. `false`: no such remote member.
    pub fn remove_remote_member(&mut self, id: &str) -> bool {
        let Some((id, p)) = self.peers.get_key_value(id) else { return false };
        if !p.remote {
            return false;
        }
        let id = id.clone();
        self.leave(&id);
        true
    }

    /// Makes `s.id` a detached local session of `s.room`, its grace period running: a new one, or a remote member
    /// that now lives here. [`Rooms::attach`] puts it on a connection.
    pub fn seat_detached(&mut self, s: Seat<'_>, now: Instant) {
        self.add_remote_member(s.room, s.id, s.name);
        let id = self.peers.get_key_value(s.id).expect("ensured").0.clone();
        self.set_token(&id, s.token);
        let p = self.peers.get_mut(&id).expect("ensured");
        p.remote = false;
        p.conn = None;
        p.publish = s.publish;
        p.sfu = s.sfu;
        p.record = s.record;
        p.epoch += 1;
        let epoch = p.epoch;
        self.deadlines.push_back((now + self.cfg.resume_grace, id, epoch));
    }

    /// Puts detached local session `id` on `conn` (which has no session): `welcome`, the room's state, then
    /// `backlog`, then what queued while it was detached. `false`: either is not so, and nothing changed.
    #[must_use]
    pub fn attach(&mut self, conn: ConnId, id: &str, resumed: bool, backlog: Vec<Frame>) -> bool {
        let free = self.conns.get(&conn).is_some_and(|c| c.peer.is_none() && !c.closing);
        let Some((id, _)) = self.peers.get_key_value(id).filter(|(_, p)| !p.remote && p.conn.is_none()) else {
            return false;
        };
        if !free {
            return false;
        }
        let (id, mut backlog) = (id.clone(), Queue::from(backlog));
        let p = self.peers.get_mut(&id).expect("found");
        p.conn = Some(conn);
        p.epoch += 1; // cancels the expiry
        backlog.extend(p.pending.drain(..));
        self.seat_on(conn, &id, resumed, backlog);
        true
    }

    /// Local session `id` resumes here with a `token` decided by the layer, on `conn` if it is still there (its
    /// old connection, if any, is closed as on a resume).
    pub fn resume_local(&mut self, conn: Option<ConnId>, id: &str, token: Arc<str>) {
        let Some((id, _)) = self.peers.get_key_value(id).filter(|(_, p)| !p.remote) else { return };
        let id = id.clone();
        self.set_token(&id, token.clone());
        if let Some(conn) = conn {
            self.resume_with(conn, id, token);
        }
    }

    /// Local session `id` lives elsewhere from now on: it becomes a remote member here, its connection (if any) is
    /// closed as on a resume, and everything it had not been sent is returned, in order. `None`: no such local
    /// session.
    pub fn hand_off(&mut self, id: &str) -> Option<Vec<Frame>> {
        let (id, _) = self.peers.get_key_value(id).filter(|(_, p)| !p.remote)?;
        let id = id.clone();
        let conn = self.peers.get_mut(&id).expect("found").conn.take();
        let mut frames = match conn {
            Some(old) => self.release_resumed(old),
            None => Queue::default(),
        };
        let p = self.peers.get_mut(&id).expect("found");
        frames.extend(p.pending.drain(..));
        p.remote = true;
        p.epoch += 1;
        // Its token is its new host's now.
        let token = std::mem::replace(&mut p.token, Arc::from(""));
        self.tokens.remove(&token);
        let room = p.room.clone();
        if !self.has_local_members(&room) {
            self.forget_room(&room);
        }
        Some(frames.into())
    }

    /// Puts `frames` ahead of what detached local session `id` has pending; a connected one gets them on its
    /// connection, behind what that was sent already (nothing is dropped).
    pub fn prepend_pending(&mut self, id: &str, frames: Vec<Frame>) {
        let Some(p) = self.peers.get_mut(id).filter(|p| !p.remote) else { return };
        if let Some(conn) = p.conn {
            for f in frames {
                self.push(conn, f);
            }
            return;
        }
        let mut pending = Queue::from(frames);
        pending.extend(p.pending.drain(..));
        p.pending = pending;
    }

    /// Moves `room` to the SFU: its local members but `except` hear `topology`. `false`: no such room, or it was
    /// an SFU room already.
    pub fn switch_to_sfu(&mut self, room: &str, except: &str) -> bool {
        let Some(r) = self.rooms.get_mut(room).filter(|r| !r.sfu) else { return false };
        r.sfu = true;
        self.broadcast(room, except, Arc::from(encode_topology_sfu()));
        true
    }

    /// `frame` to every local member of `room` but `except`.
    pub fn broadcast_local(&mut self, room: &str, except: &str, frame: Frame) {
        self.broadcast(room, except, frame);
    }

    /// Whether any member of the room is not remote.
    pub fn has_local_members(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(|r| r.members.iter().any(|m| !self.peers[m].remote))
    }

    /// A frame from outside for local session `to`. `false`: no such local session, or it just ended (see
    /// [`Rooms::sfu_frame`]).
    pub fn deliver_local(&mut self, to: &str, frame: Frame) -> bool {
        if self.peers.get(to).is_none_or(|p| p.remote) {
            return false;
        }
        self.deliver(to, frame)
    }

    /// How many more frames local session `id`'s connection takes before it counts as a slow reader (`None`: no
    /// such connected session). A layer paces bursts from outside with it.
    pub fn queue_room(&self, id: &str) -> Option<usize> {
        let c = self.peers.get(id).filter(|p| !p.remote)?.conn.and_then(|c| self.conns.get(&c))?;
        if c.out.bytes() * 2 > c.limit_bytes {
            return Some(0);
        }
        Some(c.limit.saturating_sub(c.out.len()))
    }

    /// A relay from local session `from` could not be passed on by the layer: its client hears `e` (not counted
    /// against its error budget: it is not the client's fault).
    pub fn relay_refused(&mut self, from: &str, e: ProtocolError, now: Instant) {
        self.now = now;
        let Some(conn) = self.peers.get(from).filter(|p| !p.remote).and_then(|p| p.conn) else { return };
        if self.accepting(conn) {
            self.counters.errors[e.code] += 1;
            self.push(conn, Arc::from(e.to_json()));
        }
    }
}
