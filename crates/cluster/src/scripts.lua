-- Shared by every script below (prepended by scripts.rs). Standalone Redis only: scripts touch keys they do not
-- declare, which Redis Cluster forbids.
--
-- wc:room:<room>   hash  peer id -> "<join seq>\31<node>"
-- wc:seq:<room>    join counter of the room (welcome lists peers in join order)
-- wc:pw:<room>     password digest set by the room's first joiner
-- wc:pwfail:<room> wrong passwords in the current minute (expires)
-- wc:peer:<id>     hash  room, node, name, token, publish, sfu ("1": speaks SFU)
-- wc:sfu:<room>    the node whose SFU carries the room's media (absent: peer-to-peer); held while that node lives
-- wc:own:<node>    set of the rooms whose SFU runs on the node
-- wc:tok:<token>   peer id of a resume token
-- wc:np:<node>     set of the node's peer ids
-- wc:nodes         set of registered nodes;  wc:alive:<node>  incarnation, with the node TTL
-- wc:ch:<node>     the node's channel: every event for it, in execution order, and its links' messages

local function members(room)
  local flat = redis.call('HGETALL', 'wc:room:' .. room)
  local list = {}
  for i = 1, #flat, 2 do
    local v = flat[i + 1]
    local sep = string.find(v, '\31', 1, true)
    list[#list + 1] = { id = flat[i], seq = tonumber(string.sub(v, 1, sep - 1)), node = string.sub(v, sep + 1) }
  end
  table.sort(list, function(a, b) return a.seq < b.seq end)
  return list
end

local function snapshot(list, except)
  local parts = {}
  for _, m in ipairs(list) do
    if m.id ~= except then
      parts[#parts + 1] = m.id .. '\31' .. (redis.call('HGET', 'wc:peer:' .. m.id, 'name') or '') .. '\31' .. m.node
    end
  end
  return table.concat(parts, '\30')
end

-- One PUBLISH per node hosting members of the room, other than `skip`.
local function notify(list, skip, payload)
  local seen = {}
  for _, m in ipairs(list) do
    if m.node ~= skip and not seen[m.node] then
      seen[m.node] = true
      redis.call('PUBLISH', 'wc:ch:' .. m.node, payload)
    end
  end
end

-- Ends a session of `node`: frees the seat and tells the other nodes of the room.
local function drop(id, node)
  local p = redis.call('HMGET', 'wc:peer:' .. id, 'room', 'token')
  redis.call('DEL', 'wc:peer:' .. id)
  redis.call('SREM', 'wc:np:' .. node, id)
  if p[2] then redis.call('DEL', 'wc:tok:' .. p[2]) end
  if not p[1] then return end
  local rk = 'wc:room:' .. p[1]
  redis.call('HDEL', rk, id)
  if redis.call('HLEN', rk) == 0 then
    local owner = redis.call('GET', 'wc:sfu:' .. p[1])
    if owner then redis.call('SREM', 'wc:own:' .. owner, p[1]) end
    redis.call('DEL', rk, 'wc:seq:' .. p[1], 'wc:pw:' .. p[1], 'wc:sfu:' .. p[1])
  else
    local list = members(p[1])
    notify(list, node, 'L\n' .. id)
    -- The room's SFU node ends the peer's media session, also when it hosts no member of the room.
    local owner = redis.call('GET', 'wc:sfu:' .. p[1])
    if owner and owner ~= node then
      local told = false
      for _, m in ipairs(list) do if m.node == owner then told = true end end
      if not told then redis.call('PUBLISH', 'wc:ch:' .. owner, 'L\n' .. id) end
    end
  end
end

-- Ends every session of `node` and unregisters it. The SFU rooms it ran move to the live node of their earliest
-- member, and every node of the room hears it (`S`: its members connect to the new SFU).
local function reap(node)
  local ids = redis.call('SMEMBERS', 'wc:np:' .. node)
  for _, id in ipairs(ids) do drop(id, node) end
  redis.call('DEL', 'wc:np:' .. node)
  for _, room in ipairs(redis.call('SMEMBERS', 'wc:own:' .. node)) do
    if redis.call('GET', 'wc:sfu:' .. room) == node then
      local list = members(room)
      for _, m in ipairs(list) do
        if m.node ~= node and redis.call('EXISTS', 'wc:alive:' .. m.node) == 1 then
          redis.call('SET', 'wc:sfu:' .. room, m.node)
          redis.call('SADD', 'wc:own:' .. m.node, room)
          notify(list, '', 'S\n' .. room .. '\n' .. m.node)
          break
        end
      end
    end
  end
  redis.call('DEL', 'wc:own:' .. node)
  redis.call('SREM', 'wc:nodes', node)
  return #ids
end
