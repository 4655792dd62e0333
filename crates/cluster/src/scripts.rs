//! The Lua scripts: every cluster-wide decision is one atomic script, and the events it causes are published
//! from inside it, so each node's channel carries them in the order Redis executed them.

const COMMON: &str = include_str!("scripts.lua");

/// ARGV: me, conn, room, id, name, token, publish, max_peers, password digest or "", resume token or "",
/// fresh allowed ("1"/"0"). Replies `ok`, `resumed`, `full:<n>`, `needpw`, `badpw`, `refused`, `retry`; the
/// admission itself arrives on the node's channel as an `A` event.
const JOIN: &str = r#"
local me, conn, room, id, name, token, publish, max, pw, resume, fresh = unpack(ARGV)
if resume ~= '' then
  local pid = redis.call('GET', 'wc:tok:' .. resume)
  if pid then
    local pk = 'wc:peer:' .. pid
    local p = redis.call('HMGET', pk, 'room', 'node', 'name', 'publish')
    if p[1] == room and (p[2] == me or redis.call('EXISTS', 'wc:alive:' .. p[2]) == 1) then
      local old = p[2]
      redis.call('DEL', 'wc:tok:' .. resume)
      redis.call('SET', 'wc:tok:' .. token, pid)
      redis.call('HSET', pk, 'token', token, 'node', me)
      local kind = 'R'
      if old ~= me then
        kind = 'E'
        redis.call('SREM', 'wc:np:' .. old, pid)
        redis.call('SADD', 'wc:np:' .. me, pid)
        local rk = 'wc:room:' .. room
        local v = redis.call('HGET', rk, pid)
        redis.call('HSET', rk, pid, string.sub(v, 1, string.find(v, '\31', 1, true)) .. me)
        redis.call('PUBLISH', 'wc:ch:' .. old, 'T\n' .. pid .. '\n' .. me)
      end
      local msg = { 'A', conn, kind, pid, token, room, p[4], p[3], snapshot(members(room), pid) }
      redis.call('PUBLISH', 'wc:ch:' .. me, table.concat(msg, '\n'))
      return 'resumed'
    end
  end
end
if fresh ~= '1' then return 'refused' end
local list = members(room)
if #list > 0 then
  local want = redis.call('GET', 'wc:pw:' .. room)
  if want and want ~= pw then
    if pw == '' then return 'needpw' end
    return 'badpw'
  end
end
if #list >= tonumber(max) then return 'full:' .. #list end
if redis.call('EXISTS', 'wc:peer:' .. id) == 1 then return 'retry' end
if #list == 0 then
  redis.call('DEL', 'wc:pw:' .. room)
  if pw ~= '' then redis.call('SET', 'wc:pw:' .. room, pw) end
end
local seq = redis.call('INCR', 'wc:seq:' .. room)
redis.call('HSET', 'wc:room:' .. room, id, seq .. '\31' .. me)
redis.call('HSET', 'wc:peer:' .. id, 'room', room, 'node', me, 'name', name, 'token', token, 'publish', publish)
redis.call('SET', 'wc:tok:' .. token, id)
redis.call('SADD', 'wc:np:' .. me, id)
notify(list, me, 'J\n' .. room .. '\n' .. id .. '\n' .. name)
local msg = { 'A', conn, 'F', id, token, room, publish, name, snapshot(list, id) }
redis.call('PUBLISH', 'wc:ch:' .. me, table.concat(msg, '\n'))
return 'ok'
"#;

/// ARGV: me, id. Ends the session if it is still this node's (it may have been resumed elsewhere).
const LEAVE: &str = r#"
if redis.call('HGET', 'wc:peer:' .. ARGV[2], 'node') ~= ARGV[1] then return 0 end
drop(ARGV[2], ARGV[1])
return 1
"#;

/// KEYS: wc:peer:<to>. ARGV: the `D` event. One PUBLISH to the node that hosts the peer *now*: looked up inside
/// Redis, so a hand-over to another node is ordered with every delivery.
pub const RELAY: &str = r#"
local n = redis.call('HGET', KEYS[1], 'node')
if n then return redis.call('PUBLISH', 'wc:ch:' .. n, ARGV[1]) end
return -1
"#;

/// ARGV: me, incarnation, ttl ms. 1: refreshed; 0: this node's registration is gone (presumed dead, or Redis
/// lost its data); -1: another process holds this node id.
const REFRESH: &str = r#"
local v = redis.call('GET', 'wc:alive:' .. ARGV[1])
if v == ARGV[2] then
  redis.call('PEXPIRE', 'wc:alive:' .. ARGV[1], ARGV[3])
  return 1
end
if v then return -1 end
return 0
"#;

/// ARGV: me, incarnation, ttl ms. Ends whatever an earlier life of this node left, then registers it. 0: a live
/// process already uses this node id.
const REGISTER: &str = r#"
if redis.call('EXISTS', 'wc:alive:' .. ARGV[1]) == 1 then return 0 end
reap(ARGV[1])
redis.call('SET', 'wc:alive:' .. ARGV[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', 'wc:nodes', ARGV[1])
return 1
"#;

/// ARGV: a node to end now ("" for none). Ends the sessions of every node whose liveness key expired.
const REAP: &str = r#"
local n = 0
if ARGV[1] ~= '' then
  n = n + reap(ARGV[1])
  redis.call('DEL', 'wc:alive:' .. ARGV[1])
end
for _, node in ipairs(redis.call('SMEMBERS', 'wc:nodes')) do
  if redis.call('EXISTS', 'wc:alive:' .. node) == 0 then n = n + reap(node) end
end
return n
"#;

pub struct Scripts {
    pub join: redis::Script,
    pub leave: redis::Script,
    pub relay: redis::Script,
    pub refresh: redis::Script,
    pub register: redis::Script,
    pub reap: redis::Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        let with_common = |body: &str| redis::Script::new(&format!("{COMMON}\n{body}"));
        Scripts {
            join: with_common(JOIN),
            leave: with_common(LEAVE),
            relay: redis::Script::new(RELAY),
            refresh: redis::Script::new(REFRESH),
            register: with_common(REGISTER),
            reap: with_common(REAP),
        }
    }
}
