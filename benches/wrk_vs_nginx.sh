#!/usr/bin/env bash
# The gateway against nginx as a reverse proxy, measured by `wrk` (an outside load client,
# as issue 16 measured it), beside the project's own load client in benches/gateway.rs.
#
#   bash benches/wrk_vs_nginx.sh                    # 1 worker, 1 run of each, ~1 min
#   RUNS=5 WORKERS="1 2" bash benches/wrk_vs_nginx.sh
#   MODES="https handshake h2" bash benches/wrk_vs_nginx.sh   # TLS and HTTP/2 downstream
#
# On loopback only: an nginx upstream answering at once (1 worker, `return 200`), and in
# front of it, one after the other, interleaved run by run:
#
#   - nginx as a reverse proxy (W workers, `reuseport`, a keep-alive upstream pool);
#   - the gateway, routing only (one route from a TOML file: prefix, strip, balancing);
#   - the gateway, full stack: global and per-client limits (set far above what a run
#     sends), an endpoint breaker, outlier detection, a timeout and a fallback;
#   - with CONFIGS naming it, the gateway, plain: routing only without the two fields it
#     makes for every request by default, a request id and a `traceparent`
#     (`request_id_header = ""`, `trace_context = false`), closer to what plain nginx
#     does (it still adds `X-Forwarded-For`, `-Host` and `-Proto`);
#
# each served by `examples/gateway_bench_server.rs` (built here with the `release-lto`
# profile, as a production binary would be) on W threads (`Gateway::spawn_threads`, or a
# multi-thread runtime with GATEWAY_RUNTIME=multi).
# `wrk -t1 -c16 -d8s --latency` against each, for each W in WORKERS. For each run:
# req/s and p99 from wrk, and CPU per request: the proxy's utime + stime from
# /proc/PID/stat (every nginx process: master and workers; the whole gateway process)
# over the run, divided by wrk's request count, and the part of it spent in user space
# (utime alone); and the TCP segments sent per request on the machine (`OutSegs` of
# /proc/net/snmp: client, proxy and upstream together, all on loopback), which tells a
# proxy that sends more packets from one that spends more per packet; and the upstream's
# CPU per request over the same run. The table gives the median of RUNS runs and two
# ratios of CPU per request to the first proxy's (nginx's): of the medians, and paired
# (the median of each run's ratio to the nginx run of the same round). The upstream's
# figure shows the machine's slow spells (every process, the upstream as much as the
# proxy, spending 10-20% more a request for a while: a run in one is no measure of the
# proxy) and how a proxy's pace changes its neighbours' work: it is not a control to divide
# by, since a faster proxy sends the upstream fewer requests a wake-up (BENCHMARKS.md).
#
# MODES picks what the clients do (each proxy configured the same way for each mode):
#
#   - http: cleartext HTTP/1.1 keep-alive, `wrk` (the default);
#   - https: HTTP/1.1 keep-alive over TLS, `wrk` (the handshakes are in the warm-up);
#   - handshake: HTTP/1.1 over TLS, `Connection: close` on every request, `wrk`: a full
#     TLS handshake per request (neither side resumes sessions), so req/s is handshakes/s
#     and CPU per request is CPU per handshake plus one request;
#   - h2: HTTP/2 over TLS (ALPN h2), `h2load -c CONNECTIONS -m STREAMS` (Debian's
#     nghttp2-client): multiplexed streams. h2load reports no p99: its mean is shown.
#
# TLS: an ECDSA P-256 certificate made here with `openssl` for 127.0.0.1; TLS 1.2 and 1.3
# on both (TLS 1.3 is what wrk and h2load negotiate); the upstream stays cleartext HTTP/1.
#
# Idempotent, bounded in time (each wrk run is DURATION; each process start is bounded),
# leaves nothing running (a trap stops every process it started; its files are in a
# temporary directory that is removed). Installs `wrk` and `nginx-light` with apt-get when
# missing and run as root (and `nghttp2-client` for MODES with h2).
#
# Environment:
#   RUNS (3)              runs of each configuration (interleaved), medians reported
#   WORKERS ("1")         proxy worker counts to measure (nginx workers = gateway threads)
#   DURATION (8s)         each wrk run; CONNECTIONS (16); WRK_THREADS (1)
#   GATEWAY_RUNTIME       threads (default: spawn_threads) or multi (multi-thread runtime)
#   GATEWAY_CPU_AFFINITY  auto, pin or off: the gateway's `--cpu-affinity` (unset: the
#                         binary's default, `auto`: one thread per CPU pinned when there
#                         are as many threads as CPUs)
#   NGINX_CPU_AFFINITY ("off")  the proxy nginx's `worker_cpu_affinity` for each run:
#                         off (nginx's default, shown as `nginx`), auto (`nginx pinned`),
#                         or both ("off auto"); ratios are against the first
#   NGINX_FIELDS          set (to anything): one more proxy, `nginx fields` (unpinned),
#                         configured to add what the gateway adds to every request by
#                         default: `X-Forwarded-For`, `-Host` and `-Proto`, a request id
#                         (`X-Request-Id`: the client's, or a new one; sent upstream and
#                         echoed to the client) and a `traceparent` (nginx's random
#                         `$request_id` as the trace id, a fixed parent id). About equal
#                         work, for comparison: not the plain proxy the ratios are against
#   NGINX_LIMITS          set (to anything): one more proxy, `nginx limits` (unpinned),
#                         configured as the gateway's full stack is where nginx can be: a
#                         global and a per-client `limit_req` (the same rates and bursts,
#                         refusals answered 429), the upstream's passive failure checks as
#                         the outlier settings (`max_fails=5 fail_timeout=30s`), a 2 s
#                         upstream timeout and a fallback answer for the upstream's errors
#                         (`error_page`). nginx has no breaker and sends no `RateLimit`
#                         fields: a little less work than the full stack, for comparison
#   GATEWAY_BINS          "label=path ..." prebuilt gateway_bench_server binaries to
#                         compare (e.g. base=/tmp/base/gateway_bench_server new=...);
#                         default: this checkout's, built with `--profile
#                         release-lto`, labelled gateway
#   PGO                   set (to anything): one more gateway binary, `pgo`: this
#                         checkout's built with profile-guided optimisation. Built with
#                         `-Cprofile-generate` (in target/pgo/generate), trained by wrk
#                         with benches/pgo_train.lua, a mix of API requests other than the
#                         measured one (GETs with queries and browser fields, JSON POSTs
#                         with a request id and a `traceparent`, a HEAD, an unknown path),
#                         for PGO_TRAIN (5s) on each configuration in CONFIGS (cleartext
#                         HTTP/1, 1 worker), merged with llvm-profdata (rustup's
#                         `llvm-tools`, added when missing) and built again with
#                         `-Cprofile-use` (in target/pgo/use)
#   CONFIGS ("routing full")  which gateway configurations to run (routing, full, plain)
#   MODES ("http")        http, https, handshake, h2 (see above); STREAMS (10) for h2
#   PROFILE=callgrind     instead of the runs: each gateway binary and configuration
#                         under valgrind's callgrind (cleartext HTTP/1, 1 worker), counters
#                         zeroed after a warm-up, then `wrk` for PROFILE_DURATION (4s):
#                         instructions and calls to `malloc` per request in the gateway's
#                         user space, which move far less from run to run than CPU time.
#                         PROFILE_KEEP=DIR keeps the profiles (for callgrind_annotate).
#                         PROFILE_CACHE=1 adds callgrind's cache and branch simulation
#                         (the machine's cache sizes) and three columns: first-level
#                         instruction cache misses and mispredicted branches per request,
#                         and the request path's code lines: the 64-byte lines holding the
#                         instructions run at least every other request, and the share of
#                         their bytes those instructions fill (benches/support/
#                         code_footprint.py; needs objdump). Simulated, not measured: for
#                         comparing builds, on machines without hardware counters too.
#                         Installs valgrind with apt-get when missing and run as root.
#   PROFILE=copies        instead of the runs: the bytes the gateway copies with libc's
#                         `memmove`/`memcpy` per request (1 worker, cleartext HTTP/1), the
#                         moves of large values (futures, requests) that callgrind counts
#                         as few instructions but that cost time: uprobes on libc's copy
#                         functions with their length, and on `send` (two a request) to
#                         count requests; `wrk` for PROFILE_DURATION (2s, slowed by the
#                         probes). Needs root and `perf` (Debian's linux-perf); the probes
#                         are removed at the end.
#   STOP_WAIT (30)        seconds a stopped process (nginx, a gateway, an instrumented
#                         or profiled one writing its profile) has to exit before it is
#                         killed; a PGO training gateway killed so fails the bench
set -euo pipefail

RUNS=${RUNS:-3}
WORKERS=${WORKERS:-1}
DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-16}
WRK_THREADS=${WRK_THREADS:-1}
GATEWAY_RUNTIME=${GATEWAY_RUNTIME:-threads}
NGINX_CPU_AFFINITY=${NGINX_CPU_AFFINITY:-off}
CONFIGS=${CONFIGS:-routing full}
MODES=${MODES:-http}
STREAMS=${STREAMS:-10}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "wrk_vs_nginx: $*" >&2; exit 1; }

# --- tools -----------------------------------------------------------------------------
NGINX=$(command -v nginx || true)
[ -z "$NGINX" ] && [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx
if ! command -v wrk >/dev/null || [ -z "$NGINX" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null
        NGINX=$(command -v nginx || echo /usr/sbin/nginx)
    fi
fi
command -v wrk >/dev/null || die "wrk is missing (apt-get install wrk)"
[ -x "$NGINX" ] || die "nginx is missing (apt-get install nginx-light)"
TLS=""
for mode in $MODES; do
    case $mode in
        http) ;;
        https | handshake) TLS=1 ;;
        h2) TLS=1
            if ! command -v h2load >/dev/null && [ "$(id -u)" = 0 ]; then
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null
            fi
            command -v h2load >/dev/null || die "h2load is missing (apt-get install nghttp2-client)" ;;
        *) die "unknown mode $mode (http, https, handshake, h2)" ;;
    esac
done
[ -z "$TLS" ] || command -v openssl >/dev/null || die "openssl is missing"
if [ "${PROFILE:-}" = callgrind ] && ! command -v callgrind_control >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
    fi
    command -v callgrind_control >/dev/null || die "valgrind is missing (apt-get install valgrind)"
fi

if [ "${PROFILE:-}" = copies ]; then
    [ "$(id -u)" = 0 ] || die "PROFILE=copies needs root (uprobes)"
    if ! command -v perf >/dev/null && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
    fi
    command -v perf >/dev/null || die "perf is missing (apt-get install linux-perf)"
fi

# This checkout's cargo target directory.
target_dir() {
    local dir
    dir=$(cd "$HERE" && cargo metadata --format-version 1 --no-deps \
        | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    echo "${dir:-$HERE/target}"
}

if [ -z "${GATEWAY_BINS:-}" ]; then
    (cd "$HERE" && cargo build --quiet --profile release-lto --features gateway${TLS:+,tls} \
        --example gateway_bench_server)
    GATEWAY_BINS="gateway=$(target_dir)/release-lto/examples/gateway_bench_server"
fi
for entry in $GATEWAY_BINS; do
    [ -x "${entry#*=}" ] || die "no gateway binary at ${entry#*=}"
done

# --- processes -------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/seawall-wrk.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do stop "$pid" || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback port (bound, read, released).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits ($2 × 50 ms, 5 s by default) until something accepts connections on
# 127.0.0.1:$1.
wait_port() {
    for _ in $(seq "${2:-100}"); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

# nginx with `$2` workers and the `http` block `$3`, in directory `$1`, its workers'
# `worker_cpu_affinity` `$4` (off by default); sets NGINX_PID.
start_nginx() {
    local dir=$1 workers=$2 http=$3 affinity=${4:-off}
    mkdir -p "$dir"
    chmod 755 "$dir"
    cat >"$dir/nginx.conf" <<EOF
worker_processes $workers;
$([ "$affinity" = off ] || echo "worker_cpu_affinity $affinity;")
daemon off;
master_process on;
pid "$dir/nginx.pid";
error_log "$dir/error.log" warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path "$dir/client_body";
    proxy_temp_path "$dir/proxy";
    fastcgi_temp_path "$dir/fastcgi";
    uwsgi_temp_path "$dir/uwsgi";
    scgi_temp_path "$dir/scgi";
$http
}
EOF
    "$NGINX" -p "$dir" -c "$dir/nginx.conf" >"$dir/out.log" 2>&1 &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
}

# True while process `$1` runs (a child that has exited but not been waited for is a
# zombie: `kill -0` would still find it).
running() {
    local stat
    stat=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [ "${stat%% *}" != Z ]
}

# Sends process `$1` the signal `$2` (TERM by default) and waits for it to end: at most
# STOP_WAIT seconds (30), then kills it, says so, and returns 1. A process that ignores
# the signal does not hang the bench.
stop() {
    local pid=$1 signal=${2:-TERM} tenths=0
    kill -"$signal" "$pid" 2>/dev/null || true
    while running "$pid"; do
        if [ "$tenths" -ge $((${STOP_WAIT:-30} * 10)) ]; then
            echo "process $pid still running ${STOP_WAIT:-30}s after SIG$signal: killed" >&2
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            return 1
        fi
        sleep 0.1
        tenths=$((tenths + 1))
    done
    wait "$pid" 2>/dev/null || true
}

# The process `$1` and its children: their utime + stime, and their utime alone, in clock
# ticks ("total user").
cpu_ticks() {
    local total=0 user=0 pid fields
    for pid in "$1" $(pgrep -P "$1"); do
        fields=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
        # After the command: state is field 3, utime 14 and stime 15 of the whole line.
        set -- $fields
        total=$((total + ${12} + ${13}))
        user=$((user + ${12}))
    done
    echo "$total $user"
}
TICK=$(getconf CLK_TCK)

# Latency text from wrk (123.45us, 1.20ms, 2.00s) in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000
        printf "%.3f", n }'
}

# The URL of proxy port $1 in mode $2.
url_of() {
    case $2 in
        http) echo "http://127.0.0.1:$1/api/items" ;;
        *) echo "https://127.0.0.1:$1/api/items" ;;
    esac
}

# TCP segments this machine has sent (all on loopback in these runs).
tcp_out_segments() {
    awk '$1 == "Tcp:" && $12 ~ /^[0-9]+$/ { print $12 }' /proc/net/snmp
}

# One load run against port $1 in mode $3, the proxy's CPU read from pid $2:
# "req/s p99_ms cpu_us user_cpu_us segments_per_request upstream_cpu_us" (for h2, the
# mean latency in place of p99).
measure() {
    local port=$1 pid=$2 mode=$3 before after out requests rps p99 errors url
    local segments_before segments_after upstream_before upstream_after
    url=$(url_of "$port" "$mode")
    segments_before=$(tcp_out_segments)
    upstream_before=$(cpu_ticks "$UP_PID")
    before=$(cpu_ticks "$pid")
    case $mode in
        h2)
            out=$(h2load -t1 -c"$CONNECTIONS" -m"$STREAMS" -D "${DURATION%s}" "$url" 2>&1)
            after=$(cpu_ticks "$pid")
            requests=$(awk '/^requests:/ { print $8 }' <<<"$out")
            rps=$(awk '/^finished in/ { print $4 }' <<<"$out")
            p99=$(awk '/^time for request:/ { print $6 }' <<<"$out")
            errors=$(awk '/^requests:/ && ($10 + $12 + $14 > 0) { print $0 }
                /^status codes:/ && ($5 + $7 + $9 > 0) { print $0 }' <<<"$out")
            ;;
        *)
            local close=()
            [ "$mode" = handshake ] && close=(-H "Connection: close")
            out=$(wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "${close[@]}" \
                "$url" 2>&1)
            after=$(cpu_ticks "$pid")
            requests=$(awk '/requests in/ { print $1 }' <<<"$out")
            rps=$(awk '/^Requests\/sec/ { print $2 }' <<<"$out")
            p99=$(awk '$1 == "99%" { print $2 }' <<<"$out")
            errors=$(awk '/Non-2xx|Socket errors/' <<<"$out")
            ;;
    esac
    segments_after=$(tcp_out_segments)
    upstream_after=$(cpu_ticks "$UP_PID")
    [ -n "$requests" ] && [ "$requests" -gt 0 ] || die "$mode load failed: $out"
    [ -z "$errors" ] || echo "  warning: $errors" >&2
    local total_before user_before total_after user_after
    read -r total_before user_before <<<"$before"
    read -r total_after user_after <<<"$after"
    awk -v r="${rps%%,*}" -v p="$(to_ms "$p99")" -v t=$((total_after - total_before)) \
        -v u=$((user_after - user_before)) -v n="$requests" -v hz="$TICK" \
        -v s=$((segments_after - segments_before)) \
        -v up=$((${upstream_after%% *} - ${upstream_before%% *})) \
        'BEGIN { printf "%.0f %.3f %.2f %.2f %.2f %.2f\n", r, p, t / hz * 1e6 / n, u / hz * 1e6 / n,
            s / n, up / hz * 1e6 / n }'
}

# A CA and a certificate for 127.0.0.1 signed by it (ECDSA P-256), in $WORK/tls.
make_certificates() {
    local dir=$WORK/tls
    mkdir -p "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=bench-ca -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
        -keyout "$dir/key.pem" -out "$dir/req.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$dir/ext"
    openssl x509 -req -in "$dir/req.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 2 -extfile "$dir/ext" -out "$dir/cert.pem" 2>/dev/null
    chmod 644 "$dir"/*.pem
}
[ -z "$TLS" ] || make_certificates

# --- the upstream ----------------------------------------------------------------------
UP_PORT=$(free_port)
start_nginx "$WORK/upstream" 1 "    server {
        listen 127.0.0.1:$UP_PORT;
        location / { default_type application/json; return 200 '{\"items\":[]}'; }
    }"
UP_PID=$NGINX_PID
wait_port "$UP_PORT" || die "the upstream did not start: $(cat "$WORK/upstream/"*.log)"

gateway_toml() { # $1: routing|full|plain, $2: port, $3: mode
    cat <<EOF
[gateway]
listen = "127.0.0.1:$2"
EOF
    if [ "$1" = plain ]; then
        cat <<'EOF'
request_id_header = ""
trace_context = false
EOF
    fi
    if [ "$3" != http ]; then
        cat <<EOF

[gateway.tls]
[[gateway.tls.certificates]]
cert = "$WORK/tls/cert.pem"
key = "$WORK/tls/key.pem"
EOF
    fi
    cat <<EOF

[[routes]]
name = "api"
path_prefix = "/api"
service = "items"
strip_prefix = true
EOF
    if [ "$1" = full ]; then
        cat <<'EOF'
timeout = "2s"

[routes.rate_limit]
global = { per_second = 10000000, burst = 10000000 }
per_client = { per_second = 10000000, burst = 10000000, key = "ip" }

[routes.breaker]
failure_rate = 0.5
window = 100
minimum_calls = 20
wait_in_open = "5s"
permitted_in_half_open = 2

[routes.fallback]
status = 200
body = '{"items":[]}'
content_type = "application/json"

[routes.balance]
strategy = "least-requests"
outlier = { consecutive_failures = 5, base_ejection = "30s", max_ejected = 0.5 }
EOF
    fi
    cat <<EOF

[[services]]
name = "items"
instances = ["127.0.0.1:$UP_PORT"]
EOF
}

# Starts proxy `$1` (nginx, or label:config) with `$2` workers for mode `$3`; sets
# PROXY_PID, PROXY_PORT.
start_proxy() {
    local name=$1 workers=$2 mode=$3 port listen tls=""
    port=$(free_port)
    listen="127.0.0.1:$port reuseport"
    if [ "$mode" != http ]; then
        # nginx 1.22 (Debian 12) spells HTTP/2 on the listen line.
        listen="127.0.0.1:$port ssl http2 reuseport"
        tls="
        ssl_certificate $WORK/tls/cert.pem;
        ssl_certificate_key $WORK/tls/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;"
    fi
    if [ "$name" = nginx ] || [ "$name" = nginx:pinned ] || [ "$name" = nginx:fields ] \
        || [ "$name" = nginx:limits ]; then
        local affinity=off fields="" maps="" server_options="" locations=""
        [ "$name" = nginx:pinned ] && affinity=auto
        if [ "$name" = nginx:fields ]; then
            # nginx's `$request_id` is 16 random bytes in hex: the trace id. nginx has no
            # other random variable, and a regex taking half of it for the parent id
            # would cost nginx more than the gateway pays for its own: the parent id is
            # fixed (a little less work than the gateway's).
            maps="    map \$http_x_request_id \$seawall_request_id {
        default \$http_x_request_id;
        \"\" \$request_id;
    }
"
            fields="
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Host \$host;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Request-Id \$seawall_request_id;
            proxy_set_header traceparent \"00-\$request_id-00f067aa0ba902b7-01\";
            add_header X-Request-Id \$seawall_request_id always;"
        fi
        if [ "$name" = nginx:limits ]; then
            # The listener's port as the global key: never empty (an empty key is not
            # counted), the same for every request.
            maps="    limit_req_zone \$server_port zone=global:1m rate=10000000r/s;
    limit_req_zone \$binary_remote_addr zone=per_client:10m rate=10000000r/s;
    limit_req_status 429;
"
            server_options=" max_fails=5 fail_timeout=30s"
            fields="
            limit_req zone=global burst=10000000 nodelay;
            limit_req zone=per_client burst=10000000 nodelay;
            proxy_connect_timeout 2s;
            proxy_send_timeout 2s;
            proxy_read_timeout 2s;
            proxy_intercept_errors on;
            error_page 500 502 503 504 = @fallback;"
            locations="
        location @fallback {
            default_type application/json;
            return 200 '{\"items\":[]}';
        }"
        fi
        start_nginx "$WORK/proxy" "$workers" "$maps    upstream items {
        server 127.0.0.1:$UP_PORT$server_options;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen $listen;$tls
        location / {
            proxy_pass http://items;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";$fields
        }$locations
    }" "$affinity"
        PROXY_PID=$NGINX_PID
    else
        local label=${name%%:*} config=${name#*:} bin
        for entry in $GATEWAY_BINS; do
            [ "${entry%%=*}" = "$label" ] && bin=${entry#*=}
        done
        gateway_toml "$config" "$port" "$mode" >"$WORK/gateway.toml"
        "$bin" "$WORK/gateway.toml" --workers "$workers" --runtime "$GATEWAY_RUNTIME" \
            ${GATEWAY_CPU_AFFINITY:+--cpu-affinity "$GATEWAY_CPU_AFFINITY"} \
            >"$WORK/gateway.log" 2>&1 &
        PROXY_PID=$!
        PIDS+=("$PROXY_PID")
    fi
    PROXY_PORT=$port
    wait_port "$port" || die "$name did not start: $(cat "$WORK"/*.log "$WORK"/proxy/*.log 2>/dev/null)"
    # Warm up: connections to the upstream opened, caches filled.
    if [ "$mode" = h2 ]; then
        h2load -t1 -c"$CONNECTIONS" -m"$STREAMS" -D 1 "$(url_of "$port" "$mode")" >/dev/null 2>&1
    else
        wrk -t1 -c"$CONNECTIONS" -d1s "$(url_of "$port" "$mode")" >/dev/null 2>&1
    fi
}

# --- profiles --------------------------------------------------------------------------
# Calls to `malloc` in a callgrind profile: the call counts of its callers.
malloc_calls() {
    callgrind_annotate --threshold=100 --auto=no --tree=caller "$1" 2>/dev/null | awk '
        found { next }
        /^[[:space:]]*$/ { calls = 0; next }
        /\*  .*malloc\.c:malloc / { found = 1; next }
        match($0, /\(([0-9,]+)x\)/) {
            n = substr($0, RSTART + 1, RLENGTH - 3); gsub(",", "", n); calls += n
        }
        END { print found ? calls : 0 }'
}

# Starts gateway binary `$2` (a GATEWAY_BINS entry's path) on one worker for configuration
# `$1`, under the command given after them if any (a profiler), waiting up to WAIT_START
# seconds; sets PROXY_PID and PROXY_URL.
start_profiled() {
    local config=$1 bin=$2 port
    shift 2
    port=$(free_port)
    gateway_toml "$config" "$port" http >"$WORK/gateway.toml"
    "$@" "$bin" "$WORK/gateway.toml" --workers 1 --runtime threads >"$WORK/gateway.log" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_port "$port" "${WAIT_START:-60}" || die "the gateway did not start: $(cat "$WORK/gateway.log")"
    PROXY_URL=$(url_of "$port" http)
}

# --- profile-guided build (PGO) --------------------------------------------------------
# This checkout's gateway_bench_server built with `-Cprofile-generate`, trained by wrk
# with benches/pgo_train.lua on each configuration, its profiles merged, and built again
# with `-Cprofile-use`; added to GATEWAY_BINS as `pgo`.
build_pgo() {
    local target sysroot host profdata raw config flags
    target=$(target_dir)/pgo
    sysroot=$(rustc --print sysroot)
    host=$(rustc -vV | sed -n 's/^host: //p')
    profdata=$sysroot/lib/rustlib/$host/bin/llvm-profdata
    if [ ! -x "$profdata" ]; then
        rustup component add llvm-tools >/dev/null 2>&1 || true
        [ -x "$profdata" ] || die "llvm-profdata is missing (rustup component add llvm-tools)"
    fi
    raw=$WORK/pgo-raw
    rm -rf "$raw"
    echo "PGO: building an instrumented gateway" >&2
    (cd "$HERE" && CARGO_TARGET_DIR=$target/generate \
        RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$raw" cargo build --quiet \
        --profile release-lto --features gateway${TLS:+,tls} --example gateway_bench_server)
    for config in $CONFIGS; do
        start_profiled "$config" "$target/generate/release-lto/examples/gateway_bench_server"
        echo "PGO: training on $config for ${PGO_TRAIN:-5s}" >&2
        wrk -t1 -c"$CONNECTIONS" -d"${PGO_TRAIN:-5s}" -s "$HERE/benches/pgo_train.lua" \
            "${PROXY_URL%/api/items}" >/dev/null 2>&1 || die "PGO training load failed"
        # The profile is written when the process exits: killed, it writes none.
        stop "$PROXY_PID" INT || die "the instrumented gateway did not exit on SIGINT"
    done
    ls "$raw"/*.profraw >/dev/null 2>&1 || die "PGO training wrote no profile"
    "$profdata" merge -o "$WORK/pgo.profdata" "$raw" || die "llvm-profdata merge failed"
    echo "PGO: building with the profile" >&2
    flags="${RUSTFLAGS:-} -Cprofile-use=$WORK/pgo.profdata"
    (cd "$HERE" && CARGO_TARGET_DIR=$target/use RUSTFLAGS="$flags" cargo build --quiet \
        --profile release-lto --features gateway${TLS:+,tls} --example gateway_bench_server)
    GATEWAY_BINS="$GATEWAY_BINS pgo=$target/use/release-lto/examples/gateway_bench_server"
}
[ -z "${PGO:-}" ] || build_pgo

if [ "${PROFILE:-}" = copies ]; then
    first=${GATEWAY_BINS%% *}
    libc=$(ldd "${first#*=}" | awk '/libc\.so\.6/ { print $3 }')
    [ -n "$libc" ] || die "no libc found for ${first#*=}"
    # glibc picks one of its copy functions for the CPU at load time: probe each one it
    # has (memcpy and memmove share them), and `send`.
    perf probe -q -d "seawall_copies:*" >/dev/null 2>&1 || true
    probes=0
    for fn in $(perf probe -x "$libc" --no-demangle --funcs='__memmove_*unaligned*&!*_chk_*' 2>/dev/null); do
        perf probe -q -x "$libc" --add "seawall_copies:c$probes=$fn len=%dx:u64" 2>/dev/null \
            && probes=$((probes + 1))
    done
    [ "$probes" -gt 0 ] || die "no uprobe could be placed on libc's copy functions"
    perf probe -q -x "$libc" --add "seawall_copies:send=__send" >/dev/null 2>&1 \
        || die "no uprobe could be placed on libc's send"
    trap 'perf probe -q -d "seawall_copies:*" >/dev/null 2>&1; cleanup' EXIT
    echo "| gateway | configuration | requests | copies/req | bytes copied/req | largest (bytes × per request) |"
    echo "|---|---|---|---|---|---|"
    for entry in $GATEWAY_BINS; do
        for config in $CONFIGS; do
            start_profiled "$config" "${entry#*=}"
            pid=$PROXY_PID url=$PROXY_URL
            wrk -t1 -c"$CONNECTIONS" -d1s "$url" >/dev/null 2>&1
            perf record -q -e 'seawall_copies:*' -p "$pid" -o "$WORK/copies.data" \
                >/dev/null 2>&1 &
            recorder=$!
            sleep 1
            wrk -t1 -c"$CONNECTIONS" -d"${PROFILE_DURATION:-2s}" "$url" >/dev/null 2>&1
            stop "$recorder" INT || true
            stop "$pid" INT || true
            perf script -i "$WORK/copies.data" -F event,trace 2>/dev/null | awk \
                -v l="${entry%%=*}" -v c="$config" '
                /seawall_copies:send/ { sends++; next }
                match($0, /len=[0-9]+/) {
                    n = substr($0, RSTART + 4, RLENGTH - 4) + 0; calls++; bytes += n; by[n]++
                }
                END {
                    r = sends / 2
                    if (r < 1) { print "| " l " | " c " | 0 | - | - | - |"; exit }
                    top = ""
                    for (k = 0; k < 5; k++) {
                        best = -1
                        for (n in by) if (!(n in used) && (best < 0 || n * by[n] > best * by[best])) best = n
                        if (best < 0) break
                        used[best] = 1
                        top = top sprintf("%s%d × %.1f", top == "" ? "" : ", ", best, by[best] / r)
                    }
                    printf "| %s | %s | %d | %.1f | %.0f | %s |\n", l, c, r, calls / r, bytes / r, top
                }'
        done
    done
    exit 0
fi

if [ "${PROFILE:-}" = callgrind ]; then
    simulate=()
    if [ -n "${PROFILE_CACHE:-}" ]; then
        command -v objdump >/dev/null || die "PROFILE_CACHE needs objdump (apt-get install binutils)"
        simulate=(--cache-sim=yes --branch-sim=yes --dump-instr=yes)
        echo "| gateway | configuration | requests | instructions/req | malloc calls/req | I1 misses/req | mispredicted branches/req | code lines (share run) |"
        echo "|---|---|---|---|---|---|---|---|"
    else
        echo "| gateway | configuration | requests | instructions/req | malloc calls/req |"
        echo "|---|---|---|---|---|"
    fi
    for entry in $GATEWAY_BINS; do
        for config in $CONFIGS; do
            WAIT_START=600 start_profiled "$config" "${entry#*=}" \
                valgrind --tool=callgrind "${simulate[@]}" --callgrind-out-file="$WORK/callgrind.%p"
            pid=$PROXY_PID url=$PROXY_URL
            wrk -t1 -c"$CONNECTIONS" -d2s "$url" >/dev/null 2>&1
            callgrind_control -z "$pid" >/dev/null 2>&1
            out=$(wrk -t1 -c"$CONNECTIONS" -d"${PROFILE_DURATION:-4s}" "$url" 2>&1)
            callgrind_control -d "$pid" >/dev/null 2>&1
            stop "$pid" INT || true
            requests=$(awk '/requests in/ { print $1 }' <<<"$out")
            [ -n "$requests" ] && [ "$requests" -gt 0 ] || die "load failed: $out"
            profile=$WORK/callgrind.$pid.1
            [ -s "$profile" ] || die "no profile dumped: $(cat "$WORK/gateway.log")"
            instructions=$(callgrind_annotate --threshold=100 --auto=no "$profile" 2>/dev/null \
                | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
            mallocs=$(malloc_calls "$profile")
            extra=""
            if [ -n "${PROFILE_CACHE:-}" ]; then
                # The totals line, by the names on the events line (I1mr; Bcm + Bim).
                extra=$(awk -v n="$requests" '
                    /^events:/ { for (i = 2; i <= NF; i++) col[$i] = i }
                    /^(summary|totals):/ {
                        printf " %.0f | %.0f |", $(col["I1mr"]) / n, ($(col["Bcm"]) + $(col["Bim"])) / n
                        exit
                    }' "$profile")
                footprint=$(python3 "$HERE/benches/support/code_footprint.py" "$profile" \
                    "${entry#*=}" "$requests") || die "code_footprint.py failed"
                extra="$extra $(awk -F'\t' '{ printf "%d (%.2f) |", $1, $3 }' <<<"$footprint")"
            fi
            awk -v l="${entry%%=*}" -v c="$config" -v n="$requests" -v i="$instructions" \
                -v m="$mallocs" -v x="$extra" \
                'BEGIN { printf "| %s | %s | %d | %.0f | %.2f |%s\n", l, c, n, i / n, m / n, x }'
            if [ -n "${PROFILE_KEEP:-}" ]; then
                mkdir -p "$PROFILE_KEEP"
                cp "$profile" "$PROFILE_KEEP/callgrind.${entry%%=*}.$config"
            fi
        done
    done
    exit 0
fi

# --- runs ------------------------------------------------------------------------------
PROXIES=()
for affinity in $NGINX_CPU_AFFINITY; do
    case $affinity in
        off) PROXIES+=(nginx) ;;
        auto) PROXIES+=(nginx:pinned) ;;
        *) die "NGINX_CPU_AFFINITY: off or auto, not $affinity" ;;
    esac
done
[ -z "${NGINX_FIELDS:-}" ] || PROXIES+=(nginx:fields)
[ -z "${NGINX_LIMITS:-}" ] || PROXIES+=(nginx:limits)
for entry in $GATEWAY_BINS; do
    for config in $CONFIGS; do PROXIES+=("${entry%%=*}:$config"); done
done
RESULTS=$WORK/results
: >"$RESULTS"
for mode in $MODES; do
    for workers in $WORKERS; do
        for run in $(seq "$RUNS"); do
            for proxy in "${PROXIES[@]}"; do
                start_proxy "$proxy" "$workers" "$mode"
                line=$(measure "$PROXY_PORT" "$PROXY_PID" "$mode")
                stop "$PROXY_PID"
                rm -rf "$WORK/proxy"
                echo "$mode|$workers|$proxy|$line|$run" >>"$RESULTS"
                echo "  $mode W=$workers run $run $proxy: $line (req/s, p99 ms, CPU and user CPU µs/req, TCP segments/req, upstream CPU µs/req)" >&2
            done
        done
    done
done

# --- the table -------------------------------------------------------------------------
echo
echo "wrk -t$WRK_THREADS -c$CONNECTIONS -d$DURATION (h2: h2load -t1 -c$CONNECTIONS -m$STREAMS)," \
    "upstream: nginx (1 worker, return 200); gateway runtime: $GATEWAY_RUNTIME;" \
    "medians of $RUNS runs; for h2 the latency is h2load's mean, not p99"
echo
echo "| mode | proxy | workers | req/s | p99 (ms) | CPU/req (µs) | of which user | upstream CPU/req | CPU/req vs nginx | paired | TCP segments/req |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for mode in $MODES; do
    for workers in $WORKERS; do
        for proxy in "${PROXIES[@]}"; do
            # This proxy's medians, and its two ratios to the first proxy (see the top).
            awk -F'|' -v m="$mode" -v w="$workers" -v p="$proxy" -v ref="${PROXIES[0]}" '
                function median(a, n,   i, j, t) {
                    for (i = 0; i < n; i++) for (j = i + 1; j < n; j++)
                        if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
                    return n % 2 ? a[int(n / 2)] : (a[n / 2 - 1] + a[n / 2]) / 2
                }
                BEGIN { n = 0; nr = 0; np = 0 }
                $1 == m && $2 == w && $3 == ref {
                    split($4, f, " "); ref_cpu[$5] = f[3]; rc[nr++] = f[3]
                }
                $1 == m && $2 == w && $3 == p {
                    split($4, f, " "); r[n] = f[1]; l[n] = f[2]; c[n] = f[3]; u[n] = f[4]
                    g[n] = f[5]; up[n] = f[6]; run[n] = $5; n++
                }
                END {
                    for (i = 0; i < n; i++)
                        if (ref_cpu[run[i]] > 0) pair[np++] = c[i] / ref_cpu[run[i]]
                    cpu = median(c, n)
                    sub(":", " ", p)
                    printf "| %s | %s | %s | %.0f | %.2f | %.1f | %.1f | %.1f | %.2f× | %.2f× | %.2f |\n",
                        m, p, w, median(r, n), median(l, n), cpu, median(u, n), median(up, n),
                        cpu / median(rc, nr), median(pair, np), median(g, n)
                }' "$RESULTS"
        done
    done
done
