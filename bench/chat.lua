-- wrk script: a non-streaming chat completion whose `user` changes on every request, so the
-- proxy hashes a fresh id each time (both arms get traffic at a 50 % rollout).
-- `done` prints one machine-readable line that bench/forwarders.py parses.

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local head = '{"model":"gpt-4o-mini","messages":['
  .. '{"role":"system","content":"You are a concise, friendly sales assistant for Acme Cloud."},'
  .. '{"role":"user","content":"Summarise the benefits of the premium plan for a team of twelve in two sentences."}'
  .. '],"temperature":0.7,"max_tokens":128,"user":"bench-user-'
local n = 0

request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, head .. n .. '"}')
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"mean_us":%.1f,'
      .. '"max_us":%d,"non2xx":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.mean, latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
