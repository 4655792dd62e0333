//! The Lua scripts: every cluster-wide decision is one atomic script, and the events it causes are published
//! from inside it, so each node's channel carries them in the order Redis executed them.

const COMMON: &str = include_str!("scripts.lua");

/// ARGV: me, conn, room, id, name, token, publish, max_peers, password digest or "", resume token or "",
/// fresh allowed ("1"/"0"), wrong passwords a room takes per minute, speaks SFU ("1"/"0"), topology
/// (auto/mesh/sfu), max SFU peers. Replies `ok`, `resumed`, `full:<n>:<cap>`, `needpw`, `badpw`,
/// `pwlimit:<seconds>`, `needsfu`, `refused`, `retry`; the admission itself arrives on the node's channel as an `A`
/// event (with whether the peer speaks SFU and the room's SFU node, or "" for peer-to-peer). The topology is decided here, so cluster-wide: a room
/// moves to the SFU as on one node, and its SFU runs on the node of the join that moved it (`S` to the others).
const JOIN: &str = r#"
local me, conn, room, id, name, token, publish, max, pw, resume, fresh, guesses, sfu, topo, maxsfu = unpack(ARGV)
if resume ~= '' then
  local pid = redis.call('GET', 'wc:tok:' .. resume)
  if pid then
    local pk = 'wc:peer:' .. pid
    local p = redis.call('HMGET', pk, 'room', 'node', 'name', 'publish', 'sfu')
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
      local owner = redis.call('GET', 'wc:sfu:' .. room) or ''
      local msg = { 'A', conn, kind, pid, token, room, p[4], p[3], p[5] or '0', owner, snapshot(members(room), pid) }
      redis.call('PUBLISH', 'wc:ch:' .. me, table.concat(msg, '\n'))
      return 'resumed'
    end
  end
end
if fresh ~= '1' then return 'refused' end
local list = members(room)
if #list > 0 then
  local want = redis.call('GET', 'wc:pw:' .. room)
  if want then
    -- Guesses are limited per room, cluster-wide, whoever makes them (a fixed one-minute window): while spent,
    -- every password is refused unchecked, a right one too.
    local fk = 'wc:pwfail:' .. room
    if pw ~= '' and tonumber(redis.call('GET', fk) or '0') >= tonumber(guesses) then
      return 'pwlimit:' .. math.max(1, math.ceil(redis.call('PTTL', fk) / 1000))
    end
    if want ~= pw then
      if pw == '' then return 'needpw' end
      if redis.call('INCR', fk) == 1 then redis.call('PEXPIRE', fk, 60000) end
      return 'badpw'
    end
  end
end
local owner = redis.call('GET', 'wc:sfu:' .. room)
local moves = false
if not owner then
  if topo == 'sfu' then
    moves = true
  elseif topo == 'auto' and sfu == '1' and #list >= 2 then
    moves = true
    for _, m in ipairs(list) do
      if redis.call('HGET', 'wc:peer:' .. m.id, 'sfu') ~= '1' then moves = false end
    end
  end
end
local cap = tonumber(max)
if owner or moves then
  if sfu ~= '1' then return 'needsfu' end
  cap = tonumber(maxsfu)
end
if #list >= cap then return 'full:' .. #list .. ':' .. cap end
if redis.call('EXISTS', 'wc:peer:' .. id) == 1 then return 'retry' end
if #list == 0 then
  redis.call('DEL', 'wc:pw:' .. room, 'wc:pwfail:' .. room)
  if pw ~= '' then redis.call('SET', 'wc:pw:' .. room, pw) end
end
local seq = redis.call('INCR', 'wc:seq:' .. room)
redis.call('HSET', 'wc:room:' .. room, id, seq .. '\31' .. me)
redis.call('HSET', 'wc:peer:' .. id, 'room', room, 'node', me, 'name', name, 'token', token, 'publish', publish,
  'sfu', sfu)
redis.call('SET', 'wc:tok:' .. token, id)
redis.call('SADD', 'wc:np:' .. me, id)
if moves then
  owner = me
  redis.call('SET', 'wc:sfu:' .. room, me)
  redis.call('SADD', 'wc:own:' .. me, room)
  -- Before the hello, as on one node: the members hear `topology` first.
  notify(list, me, 'S\n' .. room .. '\n' .. me)
end
notify(list, me, 'J\n' .. room .. '\n' .. id .. '\n' .. me .. '\n' .. name)
local msg = { 'A', conn, 'F', id, token, room, publish, name, sfu, owner or '', snapshot(list, id) }
redis.call('PUBLISH', 'wc:ch:' .. me, table.concat(msg, '\n'))
return 'ok'
"#;

/// ARGV: me, id. Ends the session if it is still this node's (it may have been resumed elsewhere).
const LEAVE: &str = r#"
if redis.call('HGET', 'wc:peer:' .. ARGV[2], 'node') ~= ARGV[1] then return 0 end
drop(ARGV[2], ARGV[1])
return 1
"#;

/// ARGV: me, incarnation, ttl ms, then per session of this node: id, room, name, token, publish, room password
/// digest or "", speaks SFU, the room's SFU node or "". Re-asserts this node and its sessions after the store lost them (Redis restarted empty, a
/// failover to a replica that was behind, or the others presumed this node dead): missing ones are added back (the
/// room's other nodes get `J`), then a `Y` event with the registered nodes and each room's membership follows on this node's channel, after
/// every event before it. Replies the ids that are now hosted by another node (resumed there meanwhile), or
/// {-1} if a live process holds this node id.
const RESTORE: &str = r#"
local me, inc, ttl = ARGV[1], ARGV[2], ARGV[3]
local v = redis.call('GET', 'wc:alive:' .. me)
if v and v ~= inc then return {-1} end
redis.call('SET', 'wc:alive:' .. me, inc, 'PX', ttl)
redis.call('SADD', 'wc:nodes', me)
local elsewhere, rooms = {}, {}
for i = 4, #ARGV, 8 do
  local id, room, name, token, publish, pw = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local sfu, owner = ARGV[i + 6], ARGV[i + 7]
  local pk = 'wc:peer:' .. id
  local node = redis.call('HGET', pk, 'node')
  if node and node ~= me then
    elsewhere[#elsewhere + 1] = id
  else
    rooms[room] = true
    redis.call('HSET', pk, 'room', room, 'node', me, 'name', name, 'token', token, 'publish', publish, 'sfu', sfu)
    if owner ~= '' and redis.call('EXISTS', 'wc:sfu:' .. room) == 0 then
      -- The SFU node this node knew, even if it has not registered again yet: it will (and keeps the room), or the
      -- nodes find it gone and reap it (and the room moves).
      redis.call('SET', 'wc:sfu:' .. room, owner)
      redis.call('SADD', 'wc:own:' .. owner, room)
    end
    if token ~= '' then redis.call('SET', 'wc:tok:' .. token, id) end
    redis.call('SADD', 'wc:np:' .. me, id)
    if pw ~= '' and redis.call('EXISTS', 'wc:pw:' .. room) == 0 then redis.call('SET', 'wc:pw:' .. room, pw) end
    local rk = 'wc:room:' .. room
    if redis.call('HEXISTS', rk, id) == 0 then
      local list = members(room)
      redis.call('HSET', rk, id, redis.call('INCR', 'wc:seq:' .. room) .. '\31' .. me)
      notify(list, me, 'J\n' .. room .. '\n' .. id .. '\n' .. me .. '\n' .. name)
    end
  end
end
local nodes = table.concat(redis.call('SMEMBERS', 'wc:nodes'), '\31')
for room in pairs(rooms) do
  local owner = redis.call('GET', 'wc:sfu:' .. room) or ''
  redis.call('PUBLISH', 'wc:ch:' .. me, 'Y\n' .. room .. '\n' .. nodes .. '\n' .. owner .. '\n' .. snapshot(members(room), ''))
end
return elsewhere
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
    pub restore: redis::Script,
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
            restore: with_common(RESTORE),
            refresh: redis::Script::new(REFRESH),
            register: with_common(REGISTER),
            reap: with_common(REAP),
        }
    }
}
