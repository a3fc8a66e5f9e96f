-- wrk script for the intake benchmark: POSTs unique, realistic Intercom data events.
--
--   wrk -t1 -c32 -d10s --latency -s bench/wrk/events.lua http://127.0.0.1:8377/events -- single 0
--   wrk -t1 -c32 -d10s --latency -s bench/wrk/events.lua http://127.0.0.1:8377/events/batch -- batch 0 100
--
-- Script args: mode ("single" | "batch"), offset (where this run's counter starts; give each
-- run against the same daemon its own, or dedup answers "duplicate" and short-circuits),
-- batch size (default 100).
--
-- Every request gets its own counter n, so every event has its own user_id/email/order id
-- and therefore its own dedup key. The request text (headers included) is split once, in
-- init, into fixed pieces around the counter; the counter has a fixed width, so
-- Content-Length never changes and a request costs one string.format and one table.concat.
-- wrk stays far from its own ceiling (measured: see bench/README.md).
--
-- done() prints one line "WRKJSON {...}" that bench/run_intake.py parses (and, with the
-- fourth arg "check", one "WRKCHECK {...}" line per thread).

local tid_counter = 0
local threads = {}

function setup(thread)
   thread:set("tid", tid_counter)
   tid_counter = tid_counter + 1
   table.insert(threads, thread)
end

local MARK = "\0"

-- ~350 bytes, 4 metadata keys, the shape apps actually send.
local function event_template(id, created_at)
   return '{"event_name":"order-completed","created_at":' .. created_at ..
      ',"user_id":"usr_' .. id .. '","email":"customer.' .. id .. '@example-shop.com",' ..
      '"metadata":{"order_id":"ord_5f1c2a9e-4b7d-' .. id .. '",' ..
      '"order_url":"https://shop.example.com/en-gb/account/orders/ord_5f1c2a9e-4b7d-' .. id .. '",' ..
      '"plan":"premium-annual-eur-billed-yearly","amount_cents":12999}}'
end

local buf = {}      -- pieces at odd indexes, counter at even ones
local slots = {}    -- the even indexes
local counter = 0

local function split(s)
   local pieces = {}
   local start = 1
   while true do
      local i = string.find(s, MARK, start, true)
      if not i then
         table.insert(pieces, string.sub(s, start))
         return pieces
      end
      table.insert(pieces, string.sub(s, start, i - 1))
      start = i + 1
   end
end

function init(args)
   local mode = args[1] or "single"
   local offset = tonumber(args[2] or "0")
   local batch = tonumber(args[3] or "100")
   local created_at = os.time() - 60
   local body
   if mode == "single" then
      body = event_template(MARK, created_at)
   elseif mode == "batch" then
      local events = {}
      for j = 1, batch do
         events[j] = event_template(MARK .. string.format("-%03d", j), created_at)
      end
      body = "[" .. table.concat(events, ",") .. "]"
   else
      error("mode must be single or batch, not " .. tostring(mode))
   end
   -- The counter is 12 digits wide in every request: body length is fixed.
   local width = 12
   local marks = #split(body) - 1
   local length = #body - marks + marks * width
   local head = "POST " .. wrk.path .. " HTTP/1.1\r\n" ..
      "Host: " .. wrk.host .. ":" .. wrk.port .. "\r\n" ..
      "Content-Type: application/json\r\n" ..
      "Content-Length: " .. length .. "\r\n\r\n"
   local pieces = split(head .. body)
   for i, p in ipairs(pieces) do
      buf[2 * i - 1] = p
      if i < #pieces then
         table.insert(slots, 2 * i)
      end
   end
   counter = offset + (tid or 0) * 10000000
   if args[4] == "check" then
      -- A short correctness run before measuring: every answer must be 202 and, for a
      -- batch, accept every event (no duplicates, nothing rejected). Only here, because a
      -- response() hook makes wrk parse every answer.
      local want = (mode == "batch") and ('"accepted":' .. batch .. ',') or nil
      response = function(status, headers, body)
         checked = (checked or 0) + 1
         if status ~= 202 or (want and not (string.find(body, want, 1, true)
               and string.find(body, '"duplicates":0', 1, true)
               and string.find(body, '"rejected":[]', 1, true))) then
            bad = (bad or 0) + 1
            if not first_bad then
               first_bad = status .. " " .. string.sub(body or "", 1, 300)
            end
         end
      end
   end
end

function request()
   counter = counter + 1
   local s = string.format("%012d", counter)
   for _, k in ipairs(slots) do
      buf[k] = s
   end
   return table.concat(buf)
end

function done(summary, latency, requests)
   -- done() runs in the main Lua state: fetch the check counters from the threads.
   for _, t in ipairs(threads) do
      local c, b, f = t:get("checked"), t:get("bad"), t:get("first_bad")
      if c then
         io.write(string.format('WRKCHECK {"checked":%d,"bad":%d,"first_bad":%q}\n',
            c, b or 0, f or ""))
      end
   end
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end
