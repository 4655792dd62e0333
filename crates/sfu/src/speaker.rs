//! The active speaker of each room, from the RFC 6464 audio levels publishers put on their audio packets. WHEP
//! players without a chosen participant follow it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::SessionId;

/// A speaker keeps the floor at least this long (a cough does not take it).
pub const HOLD: Duration = Duration::from_secs(2);
/// Loudness is smoothed, and fades after the last packet, with this time constant.
const TAU: f32 = 0.5;
/// A challenger must be this many times louder than the current speaker.
const MARGIN: f32 = 2.0;

#[derive(Debug, Clone, Copy)]
struct Level {
    /// Smoothed linear amplitude (1.0 = 0 dBov).
    loudness: f32,
    at: Instant,
}

impl Level {
    fn at(&self, now: Instant) -> f32 {
        self.loudness * (-now.saturating_duration_since(self.at).as_secs_f32() / TAU).exp()
    }
}

#[derive(Debug, Default)]
struct Room {
    current: Option<(SessionId, Instant)>,
    levels: HashMap<SessionId, Level>,
}

#[derive(Debug, Default)]
pub struct Speakers {
    rooms: HashMap<Arc<str>, Room>,
}

impl Speakers {
    /// An audio packet of `session` at `level` dBov (0 loudest, -127 silence). `Some`: the room's speaker changed to
    /// this session.
    pub fn observe(&mut self, room: &Arc<str>, session: SessionId, level: i8, now: Instant) -> Option<SessionId> {
        let r = self.rooms.entry(room.clone()).or_default();
        let amplitude = 10f32.powf(f32::from(level.clamp(-127, 0)) / 20.0);
        let l = r.levels.entry(session).or_insert(Level { loudness: 0.0, at: now });
        let dt = now.saturating_duration_since(l.at).as_secs_f32();
        let keep = (-dt / TAU).exp();
        l.loudness = l.loudness * keep + amplitude * (1.0 - keep);
        l.at = now;
        let mine = l.loudness;
        match r.current {
            Some((s, _)) if s == session => None,
            Some((s, since)) => {
                let theirs = r.levels.get(&s).map_or(0.0, |l| l.at(now));
                if now >= since + HOLD && mine > theirs * MARGIN && mine > 1e-3 {
                    r.current = Some((session, now));
                    Some(session)
                } else {
                    None
                }
            }
            None if mine > 1e-3 => {
                r.current = Some((session, now));
                Some(session)
            }
            None => None,
        }
    }

    /// The room's speaker, if anyone has spoken.
    pub fn current(&self, room: &str) -> Option<SessionId> {
        self.rooms.get(room).and_then(|r| r.current).map(|(s, _)| s)
    }

    /// The session left: it is nobody's speaker any more.
    pub fn remove(&mut self, room: &str, session: SessionId) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        r.levels.remove(&session);
        if r.current.is_some_and(|(s, _)| s == session) {
            r.current = None;
        }
        if r.levels.is_empty() {
            self.rooms.remove(room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_louder_one_takes_the_floor_after_the_hold() {
        let mut s = Speakers::default();
        let room: Arc<str> = "r".into();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        assert_eq!(s.observe(&room, 1, -127, ms(0)), None, "silence is nobody");
        assert_eq!(s.observe(&room, 1, -20, ms(20)), Some(1));
        // 2 is louder at once, but 1 holds the floor for HOLD.
        let mut switched = None;
        for i in 2..200u64 {
            s.observe(&room, 1, -60, ms(i * 20));
            if let Some(x) = s.observe(&room, 2, -10, ms(i * 20 + 1)) {
                switched = Some((x, i * 20));
                break;
            }
        }
        let (who, at) = switched.expect("2 takes the floor");
        assert_eq!(who, 2);
        assert!(at >= HOLD.as_millis() as u64, "not before the hold: {at} ms");
        assert_eq!(s.current("r"), Some(2));
        s.remove("r", 2);
        assert_eq!(s.current("r"), None);
    }
}
