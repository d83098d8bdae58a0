-- wrk script: the traffic a profile-guided build of the gateway is trained on
-- (`PGO=1 bash benches/wrk_vs_nginx.sh`). A mix of API requests, not the one measured
-- after: GETs with a query and a browser's fields, JSON POSTs carrying a request id and a
-- `traceparent`, a HEAD, and a path no route serves (404). Sent in turn, round-robin.
local reqs = {}
local body = '{"customer":"c-1029","items":[{"sku":"A-100","qty":2},{"sku":"B-7","qty":1}],"note":"' .. string.rep("x", 200) .. '"}'
local common = {
  ["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) train/1.0",
  ["Accept"] = "application/json, text/plain, */*",
  ["Accept-Encoding"] = "gzip, deflate, br",
  ["Accept-Language"] = "en-GB,en;q=0.9",
  ["Cookie"] = "session=4f2a9c0e7b1d; theme=dark",
}
local function with(extra)
  local h = {}
  for k, v in pairs(common) do h[k] = v end
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end
init = function(args)
  for i = 1, 16 do
    reqs[#reqs + 1] = wrk.format("GET", "/api/items?page=" .. i .. "&sort=price", with())
  end
  for i = 1, 4 do
    reqs[#reqs + 1] = wrk.format("POST", "/api/orders", with({["Content-Type"] = "application/json",
      ["X-Request-Id"] = "req-" .. i, ["traceparent"] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}), body)
  end
  reqs[#reqs + 1] = wrk.format("GET", "/missing/route", with())
  reqs[#reqs + 1] = wrk.format("HEAD", "/api/items", with())
end
local n = 0
request = function()
  n = n + 1
  return reqs[(n % #reqs) + 1]
end
