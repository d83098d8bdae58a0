//! What a demanding new user meets in the first hour: the commands the docs give, the
//! gateway's TOML configuration (each invalid one refused at load or build, naming its
//! field; each valid one doing what its docs say), over real loopback requests. Each test
//! pins a defect found in review.

use seawall::gateway::{BuildError, Discovery, Gateway, GatewayConfig};

/// Every `cargo run --example <name> --features <list>` written in the README, the docs,
/// the examples and the benches' scripts names the features Cargo.toml requires for that
/// example (directly or through the features it enables): a new user's first command
/// must not end in cargo's "requires the features" error.
#[test]
fn every_documented_example_command_has_the_features_it_needs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    // [features]: name = ["a", "dep:x", "hyper/server", ...]
    let mut implies = std::collections::HashMap::<String, Vec<String>>::new();
    let features = manifest.split("[features]").nth(1).unwrap();
    let features = features.split("\n[").next().unwrap();
    for line in features.lines() {
        let Some((name, list)) = line.split_once(" = [") else {
            continue;
        };
        let items = list
            .trim_end_matches(']')
            .split(',')
            .map(|i| i.trim().trim_matches('"').to_owned())
            .filter(|i| !i.is_empty() && !i.contains(':') && !i.contains('/'))
            .collect();
        implies.insert(name.trim().to_owned(), items);
    }
    let mut required = std::collections::HashMap::<String, Vec<String>>::new();
    for block in manifest.split("[[example]]").skip(1) {
        let block = block.split("\n[").next().unwrap();
        let field = |key: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().trim_start_matches('=').trim().to_owned())
        };
        let name = field("name").unwrap().trim_matches('"').to_owned();
        let needs = field("required-features")
            .map(|v| {
                v.trim_matches(['[', ']'])
                    .split(',')
                    .map(|f| f.trim().trim_matches('"').to_owned())
                    .filter(|f| !f.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        required.insert(name, needs);
    }
    let enabled = |given: &[&str]| {
        let mut on: std::collections::HashSet<String> =
            given.iter().map(|s| s.to_string()).collect();
        let mut todo: Vec<String> = on.iter().cloned().collect();
        while let Some(f) = todo.pop() {
            for g in implies.get(&f).into_iter().flatten() {
                if on.insert(g.clone()) {
                    todo.push(g.clone());
                }
            }
        }
        on
    };
    let mut files = vec![];
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "fuzz" {
                    dirs.push(path);
                }
            } else if [".rs", ".md", ".toml", ".sh"]
                .iter()
                .any(|e| name.ends_with(e))
            {
                files.push(path);
            }
        }
    }
    let mut wrong = vec![];
    let mut seen = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines() {
            let Some((_, rest)) = line.split_once("cargo run --example ") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap_or("").trim_matches(['`', '"', '\'']);
            let Some(needs) = required.get(name) else {
                continue;
            };
            seen += 1;
            let given: Vec<&str> = rest
                .split_once("--features")
                .map(|(_, f)| {
                    f.trim_start_matches('=')
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                })
                .map(|f| {
                    f.trim_matches(['`', '"', '\'', ')', ':'])
                        .split(',')
                        .collect()
                })
                .unwrap_or_default();
            let on = enabled(&given);
            let missing: Vec<&String> = needs.iter().filter(|f| !on.contains(*f)).collect();
            if !missing.is_empty() {
                wrong.push(format!(
                    "{}: `{}` lacks {missing:?}",
                    file.strip_prefix(root).unwrap().display(),
                    line.trim()
                ));
            }
        }
    }
    assert!(seen >= 10, "found only {seen} commands");
    assert!(
        wrong.is_empty(),
        "commands that cargo refuses:\n{}",
        wrong.join("\n")
    );
}

/// The error `toml` gets: at load (`GatewayConfig::from_toml_str`) or, if it loads, when
/// the gateway is built with its static services. Panics if it is accepted.
async fn refusal(toml: &str) -> seawall::ConfigError {
    let config = match GatewayConfig::from_toml_str(toml) {
        Err(e) => return e,
        Ok(config) => config,
    };
    match Gateway::build(config, Discovery::Static).await {
        Err(BuildError::Config(e)) => e,
        Err(e) => panic!("refused, but not as a ConfigError naming a field: {e}"),
        Ok(_) => panic!("accepted:\n{toml}"),
    }
}

/// One route `/api` with the settings `route` to a static service, `[gateway]` with
/// `server`, and `extra` at the end (other sections).
fn config(server: &str, route: &str, extra: &str) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n{server}\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n{route}\n\n\
         [[services]]\nname = \"up\"\ninstances = [\"127.0.0.1:9\"]\n\n{extra}\n"
    )
}

#[tokio::test]
async fn on_missing_without_a_header_key_is_refused() {
    // `on_missing` says what a request without the key header gets; with `key = "ip"`
    // (or no key) there is no header, and the setting was silently ignored.
    for limit in [
        r#"per_client = { per_second = 5, key = "ip", on_missing = "reject" }"#,
        r#"per_client = { per_second = 5, on_missing = "shared" }"#,
        r#"per_client = { per_second = 5, key = "ip", on_missing = "allow" }"#,
    ] {
        let err = refusal(&config("", &format!("rate_limit = {{ {limit} }}"), "")).await;
        assert_eq!(
            err.field(),
            "routes[0].rate_limit.per_client.on_missing",
            "{err}"
        );
        assert!(err.reason().contains("header:"), "{err}");
    }
    // The default, written out, and a header key with any `on_missing`, are fine.
    for limit in [
        r#"per_client = { per_second = 5, key = "ip", on_missing = "ip" }"#,
        r#"per_client = { per_second = 5, key = "header:x-api-key", on_missing = "reject" }"#,
    ] {
        GatewayConfig::from_toml_str(&config("", &format!("rate_limit = {{ {limit} }}"), ""))
            .unwrap();
    }
}

#[tokio::test]
async fn a_fallback_body_on_a_status_without_content_is_refused() {
    // 204 and 304 are sent without the body (silently dropped); 205 was sent with it,
    // which RFC 9110 §15.3.6 forbids.
    for status in [204, 205, 304] {
        let route = format!("fallback = {{ status = {status}, body = '{{}}' }}");
        let err = refusal(&config("", &route, "")).await;
        assert_eq!(err.field(), "routes[0].fallback.body", "{status}: {err}");
        assert!(err.reason().contains(&status.to_string()), "{err}");
    }
    // Without a body they are fine.
    GatewayConfig::from_toml_str(&config("", "fallback = { status = 204 }", "")).unwrap();
}

#[tokio::test]
async fn a_fallback_content_type_must_be_a_media_type() {
    for content_type in ["", "json", "application/", "/json", "text plain"] {
        let route = format!("fallback = {{ body = 'down', content_type = '{content_type}' }}");
        let err = refusal(&config("", &route, "")).await;
        assert_eq!(
            err.field(),
            "routes[0].fallback.content_type",
            "{content_type:?}: {err}"
        );
    }
    for content_type in [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/grpc",
    ] {
        let route = format!("fallback = {{ body = 'down', content_type = '{content_type}' }}");
        GatewayConfig::from_toml_str(&config("", &route, "")).unwrap();
    }
}

#[tokio::test]
async fn a_json_fallback_body_must_be_json() {
    // The content type defaults to application/json: a plain-text body went out labelled
    // JSON, and clients failed to parse the very answer meant to keep them working.
    for route in [
        "fallback = { body = 'Service temporarily unavailable' }",
        "fallback = { body = '{\"users\":[]', content_type = 'application/json' }",
        "fallback = { body = 'oops', content_type = 'application/problem+json' }",
    ] {
        let err = refusal(&config("", route, "")).await;
        assert_eq!(err.field(), "routes[0].fallback.body", "{route}: {err}");
        assert!(err.reason().contains("JSON"), "{err}");
    }
    for route in [
        "fallback = { body = '{\"users\":[]}' }",
        "fallback = { body = '' }",
        "fallback = { body = 'down', content_type = 'text/plain' }",
        "fallback = { body = '{\"x\":1}', content_type = 'Application/Problem+JSON; charset=utf-8' }",
    ] {
        GatewayConfig::from_toml_str(&config("", route, "")).unwrap();
    }
}

/// An upstream that answers every request `200` with the request's target.
async fn echo_upstream() -> std::net::SocketAddr {
    super::raw_http::heads_upstream(|head| super::raw_http::target_of(head).to_owned())
        .await
        .addr
}

/// A gateway with one route per `(name, prefix)` to an upstream that echoes the target.
async fn routes_gateway(routes: &[(&str, &str)]) -> seawall::gateway::GatewayHandle {
    let upstream = echo_upstream().await;
    let mut toml = String::from("[gateway]\nlisten = \"127.0.0.1:0\"\n");
    for (name, prefix) in routes {
        toml.push_str(&format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nservice = \"up\"\n"
        ));
    }
    toml.push_str(&format!(
        "[[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\n"
    ));
    super::spawn_gateway(&toml).await
}

#[tokio::test]
async fn a_prefix_clients_must_percent_encode_is_refused_and_its_escape_routes() {
    // `/ü` loaded, but clients send it as `/%C3%BC` (a raw non-ASCII byte is not allowed
    // in a request target), which never matched it: a route nobody could reach. Its
    // escaped form was refused ("write the characters themselves").
    for prefix in ["/café", "/ü/x", "/a{b}", "/a<b>"] {
        let err = refusal(&config("", "", "").replace("\"/api\"", &format!("{prefix:?}"))).await;
        assert_eq!(err.field(), "routes[0].path_prefix", "{prefix}: {err}");
        assert!(err.reason().contains('%'), "{prefix}: {err}");
    }
    // Escapes not in the form requests are matched in: named, with the form to write.
    for (prefix, normal) in [("/caf%c3%a9", "/caf%C3%A9"), ("/%41pi", "/Api")] {
        let err = refusal(&config("", "", "").replace("\"/api\"", &format!("{prefix:?}"))).await;
        assert_eq!(err.field(), "routes[0].path_prefix", "{prefix}: {err}");
        assert!(err.reason().contains(normal), "{prefix}: {err}");
    }
    for prefix in ["/a%2Fb", "/a%zz", "/a%00"] {
        let err = refusal(&config("", "", "").replace("\"/api\"", &format!("{prefix:?}"))).await;
        assert_eq!(err.field(), "routes[0].path_prefix", "{prefix}: {err}");
    }

    let gw = routes_gateway(&[("cafe", "/caf%C3%A9"), ("root", "/")]).await;
    for (target, routed_to) in [
        ("/caf%C3%A9", "cafe"),
        ("/caf%c3%a9/menu", "cafe"),
        ("/caf%C3%A9s", "root"),
        ("/cafe", "root"),
    ] {
        assert_eq!(routed(&gw, target).await, routed_to, "{target}");
    }
}

/// The route `target` went to (the one whose request count grew), after a `200`.
async fn routed(gw: &seawall::gateway::GatewayHandle, target: &str) -> String {
    let counts = || {
        gw.gateway()
            .status()
            .routes
            .into_iter()
            .map(|r| (r.name, r.requests))
            .collect::<Vec<_>>()
    };
    let before = counts();
    let (status, body) = super::raw_http::get(gw.local_addr(), target).await;
    assert_eq!(status, 200, "{target}: {body}");
    let after = counts();
    let grew: Vec<_> = after
        .iter()
        .zip(&before)
        .filter(|(a, b)| a.1 > b.1)
        .map(|(a, _)| a.0.clone())
        .collect();
    assert_eq!(grew.len(), 1, "{target}: {grew:?}");
    grew[0].clone()
}

#[tokio::test]
async fn a_breaker_minimum_calls_above_its_window_is_refused() {
    // The gateway cut it to the window without a word (a window of 10 holds 10 calls),
    // where the breaker's own builder refuses it.
    let err = refusal(&config(
        "",
        "breaker = { window = 10, minimum_calls = 100 }",
        "",
    ))
    .await;
    assert_eq!(err.field(), "routes[0].breaker.minimum_calls", "{err}");
    assert!(err.reason().contains("window"), "{err}");
    // Left out, it is 10, or the window when that is smaller.
    for (breaker, minimum) in [
        ("breaker = { window = 5 }", 5),
        ("breaker = { window = 50 }", 10),
        ("breaker = { window = 50, minimum_calls = 50 }", 50),
    ] {
        let config = GatewayConfig::from_toml_str(&config("", breaker, "")).unwrap();
        let settings = config.routes[0].breaker.as_ref().unwrap();
        assert_eq!(settings.minimum_calls, minimum, "{breaker}");
    }
}

#[tokio::test]
async fn an_http2_header_list_bound_above_the_head_bound_is_refused() {
    // `max_headers_size` stops at 1 MiB ("larger heads are mistakes or attacks"); the
    // HTTP/2 bound on the same header list took anything up to 4 GiB.
    for size in [4_294_967_295_u32, 1_048_577] {
        let server = format!("http2 = {{ max_header_list_size = {size} }}");
        let err = refusal(&config(&server, "", "")).await;
        assert_eq!(
            err.field(),
            "gateway.http2.max_header_list_size",
            "{size}: {err}"
        );
    }
    let server = "http2 = { max_header_list_size = 1048576 }";
    GatewayConfig::from_toml_str(&config(server, "", "")).unwrap();
}

#[tokio::test]
async fn an_unresolved_dollar_or_template_placeholder_secret_is_refused() {
    // SECURITY.md: "Nothing is interpolated: a `secret` of the form `${...}` is refused
    // rather than used as a literal key." The same mistake in the other common
    // placeholder forms (envsubst / docker-compose `$NAME`, an unrendered Helm or Jinja
    // `{{ ... }}`) loads, and the placeholder's text, public in the deployment's
    // templates (the name below is the one the crate's own docs use), becomes the HMAC
    // key: anyone can sign tokens with it.
    for secret in ["$GATEWAY_JWT_SECRET", "{{ .Values.jwtSecret }}"] {
        let jwt = format!("[auth.jwt]\nsecret = \"{secret}\"\n");
        let err = refusal(&config("", "auth = true", &jwt)).await;
        assert_eq!(err.field(), "auth.jwt.secret", "{secret}: {err}");
    }
}

#[tokio::test]
async fn the_public_jwt_io_sample_secret_is_refused() {
    // jwt.io's debugger signs its sample HS256 token with `your-256-bit-secret`, the
    // best-known public JWT secret, and the one copied into configurations. It passes
    // every weak-secret rule (19 bytes, 14 distinct, no period), so a gateway keyed with
    // it accepts tokens anyone forges. RFC 7518 §3.2: "A key of the same size as the
    // hash output (for instance, 256 bits for \"HS256\") or larger MUST be used": 19
    // bytes of text is far below, and so is the 16-byte minimum.
    let jwt = "[auth.jwt]\nsecret = \"your-256-bit-secret\"\n";
    let err = refusal(&config("", "auth = true", jwt)).await;
    assert_eq!(err.field(), "auth.jwt.secret", "{err}");
}

#[tokio::test]
async fn an_empty_jwt_issuer_or_audience_is_refused() {
    // `issuer = ""` (a template whose variable was empty) loaded and then refused every
    // token that had an issuer: only `"iss": ""` matched.
    for (key, field) in [
        ("issuer", "auth.jwt.issuer"),
        ("audience", "auth.jwt.audience"),
    ] {
        let jwt =
            format!("[auth.jwt]\nsecret = \"0123456789abcdefghijklmnopqrstuv\"\n{key} = \"\"\n");
        let err = refusal(&config("", "auth = true", &jwt)).await;
        assert_eq!(err.field(), field, "{err}");
    }
}

#[tokio::test]
async fn a_jwt_issuer_or_audience_with_stray_whitespace_is_refused() {
    // ` https://issuer.example` (a template's stray space) loaded and then refused every
    // token: the claims are compared exactly, and no token's `iss` has the space.
    for (key, field) in [
        ("issuer", "auth.jwt.issuer"),
        ("audience", "auth.jwt.audience"),
    ] {
        for value in [" https://issuer.example", "api\t"] {
            let jwt = format!(
                "[auth.jwt]\nsecret = \"0123456789abcdefghijklmnopqrstuv\"\n{key} = \"{value}\"\n"
            );
            let err = refusal(&config("", "auth = true", &jwt)).await;
            assert_eq!(err.field(), field, "{value:?}: {err}");
        }
    }
}

#[tokio::test]
async fn a_service_whose_instances_all_left_is_answered_without_waiting_out_the_timeout() {
    // The demo's "every product instance goes down": once the instances have left
    // discovery, each request waited the route's whole timeout (10 s by default) for an
    // endpoint before its fallback, holding the client and a connection, where an empty
    // service should be answered at once, as open breakers are.
    use seawall::discovery::{Instance, Registry};
    let upstream = echo_upstream().await;
    let registry = Registry::new();
    let guard = registry.register(Instance::local("up", upstream));
    let toml = "[gateway]\nlisten = \"127.0.0.1:0\"\n\
        [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"3s\"\n\
        fallback = { body = '{\"fallback\":true}' }\n";
    let config = GatewayConfig::from_toml_str(toml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = Gateway::build(config, Discovery::Registry(registry.clone()))
        .await
        .unwrap()
        .spawn(listener);
    let (status, body) = super::raw_http::get(gw.local_addr(), "/api/x").await;
    assert_eq!((status, body.as_str()), (200, "/api/x"));

    drop(guard);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    for _ in 0..3 {
        let started = tokio::time::Instant::now();
        let (status, body) = super::raw_http::get(gw.local_addr(), "/api/x").await;
        let took = started.elapsed();
        assert_eq!((status, body.as_str()), (200, "{\"fallback\":true}"));
        assert!(
            took < std::time::Duration::from_millis(500),
            "the fallback took {took:?}, the route timeout is 3 s"
        );
    }
}

/// The README's quick start is two blocks a new user copies: its `[dependencies]` must
/// name every crate its Rust code uses (it named seawall alone, and the code did not
/// compile: `unresolved import axum`, `http`, `tower`, `tokio`).
#[test]
fn the_quick_start_dependencies_name_every_crate_its_code_uses() {
    let readme = include_str!("../../README.md");
    let quick = &readme[readme.find("## Quick start").unwrap()..];
    let quick = &quick[..quick[3..].find("\n## ").unwrap()];
    let block = |fence: &str| {
        let start = quick.find(fence).unwrap() + fence.len();
        &quick[start..start + quick[start..].find("```").unwrap()]
    };
    let manifest = block("```toml\n");
    let code = block("```rust\n");
    let declared: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.split_once('=').map(|(name, _)| name.trim()))
        .collect();
    // Crates: the first segment of each `use`, and the root of each path in the code
    // (not the paths inside a `use`'s braces).
    let mut used = std::collections::BTreeSet::new();
    for line in code.lines().map(str::trim) {
        if let Some(path) = line.strip_prefix("use ") {
            used.insert(path.split("::").next().unwrap().to_owned());
            continue;
        }
        for word in line.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
            // (`name::<T>` is a turbofish, not a path.)
            if let Some((root, rest)) = word.split_once("::") {
                let crate_like = root.chars().all(|c| c.is_ascii_lowercase() || c == '_');
                if !root.is_empty() && !rest.is_empty() && crate_like {
                    used.insert(root.to_owned());
                }
            }
        }
    }
    let missing: Vec<_> = used
        .iter()
        .filter(|c| !["std", "seawall", "self", "super", "crate"].contains(&c.as_str()))
        .filter(|c| !declared.contains(&c.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "not in the quick start's [dependencies]: {missing:?}"
    );
}

/// A `[[services]]` entry no route names was never checked: a `ca_file` that is not
/// there (or a `server_name` that is no name) loaded and built, and was refused only
/// when a route came to use it, in another deploy. Every entry is now checked at load as
/// a used one is, with the same error; one that is valid and unused is built into
/// nothing (and logged as a warning), so a service can still be staged before its route.
#[cfg(feature = "tls")]
#[tokio::test]
async fn an_unused_service_is_checked_as_a_used_one_is() {
    for (tls, field) in [
        (
            "ca_file = \"/nonexistent/seawall-review/ca.pem\"",
            "services `staged`.tls.ca_file",
        ),
        (
            "server_name = \"not a name\"",
            "services `staged`.tls.server_name",
        ),
    ] {
        let staged = format!(
            "[[services]]\nname = \"staged\"\ninstances = [\"127.0.0.1:9\"]\n\
             [services.tls]\n{tls}\n"
        );
        let unused = config("", "", &staged);
        let used = unused.replace("service = \"up\"", "service = \"staged\"");
        let (unused, used) = (refusal(&unused).await, refusal(&used).await);
        assert_eq!(unused.field(), field, "{unused}");
        assert_eq!(unused.to_string(), used.to_string());
        // Refused when the configuration loads, not later when it is built.
        let text = config("", "", &staged);
        assert!(GatewayConfig::from_toml_str(&text).is_err());
    }
    // Valid and unused: loads and builds.
    let staged = "[[services]]\nname = \"staged\"\ninstances = [\"127.0.0.1:9\"]\n\
                  [services.tls]\nserver_name = \"staged.internal\"\n";
    let config = GatewayConfig::from_toml_str(&config("", "", staged)).unwrap();
    Gateway::build(config, Discovery::Static).await.unwrap();
}

/// `[redis]` was checked at load only as far as its URL's scheme: a URL the Redis client
/// cannot parse (a port that is no number, a path that is no database) or seed nodes a
/// cluster client refuses (a Unix socket) loaded while no limit used the section, and
/// failed the build (as a route's error, not one naming the field) once one did. The
/// section is now parsed at load as the limiter's client parses it, used or not, without
/// connecting.
#[cfg(feature = "redis")]
#[tokio::test]
async fn an_unused_redis_section_is_checked_as_a_used_one_is() {
    let redis_limit = "rate_limit = { global = { per_second = 5, policy = \"redis\" } }";
    for (redis, field) in [
        ("url = \"redis://127.0.0.1:notaport/\"", "redis.url"),
        ("url = \"redis://127.0.0.1:6379/notadb\"", "redis.url"),
        // Without the `redis-tls` feature, for the feature; with it, for `#insecure`.
        ("url = \"rediss://127.0.0.1:6380/#insecure\"", "redis.url"),
        (
            "nodes = [\"redis://127.0.0.1:7000/\", \"redis://127.0.0.1:x/\"]",
            "redis.nodes[1]",
        ),
        ("nodes = [\"redis+unix:///run/redis.sock\"]", "redis.nodes"),
    ] {
        let section = format!("[redis]\n{redis}\n");
        let unused = refusal(&config("", "", &section)).await;
        let used = refusal(&config("", redis_limit, &section)).await;
        assert_eq!(unused.field(), field, "{redis}: {unused}");
        assert_eq!(unused.to_string(), used.to_string(), "{redis}");
    }
    // A valid section loads and builds, used or not, without Redis being there.
    for route in ["", redis_limit] {
        let text = config("", route, "[redis]\nurl = \"redis://127.0.0.1:9/\"\n");
        let config = GatewayConfig::from_toml_str(&text).unwrap();
        Gateway::build(config, Discovery::Static).await.unwrap();
    }
}

/// The request id is sent upstream and set on the client's answer, replacing the
/// upstream's field of that name (`trace.rs`, `Hop::finish`). A name that is a field
/// with HTTP semantics of its own is refused as `host` or `content-type` are: with
/// `content-encoding` an upstream's `gzip` answer reached the client labelled with a
/// UUID as its coding, with `location` every redirect pointed at the request id, with
/// `www-authenticate` every `401` lost its challenge, and every request without the
/// field reached the upstream with `Expect: <uuid>` (answered `417`), `If-Match: <uuid>`
/// (`412`) or `Content-Encoding: <uuid>` (`415`).
#[tokio::test]
async fn a_request_id_header_with_http_semantics_of_its_own_is_refused() {
    for name in [
        "expect",
        "content-encoding",
        "content-range",
        "location",
        "www-authenticate",
        "if-match",
        "range",
    ] {
        let server = format!("request_id_header = \"{name}\"");
        let err = refusal(&config(&server, "", "")).await;
        assert_eq!(err.field(), "gateway.request_id_header", "{name}: {err}");
    }
    for name in ["x-request-id", "x-correlation-id", "request-id"] {
        let server = format!("request_id_header = \"{name}\"");
        GatewayConfig::from_toml_str(&config(&server, "", "")).unwrap();
    }
}

/// Every duration setting is held to 1ms..=24h (`MAX_SETTING`: "the longest duration
/// any setting accepts (a day): longer values are mistakes"), except
/// `[gateway.http2] keep_alive_interval`, checked only against zero: `"1ns"` (a `PING`
/// to every idle HTTP/2 client as soon as it answered the last one) and `"1000h"` loaded.
#[tokio::test]
async fn an_http2_keep_alive_interval_is_held_to_the_duration_bounds() {
    for interval in ["1ns", "500us", "25h", "1000h"] {
        let server = format!("http2 = {{ keep_alive_interval = \"{interval}\" }}");
        let err = refusal(&config(&server, "", "")).await;
        assert_eq!(
            err.field(),
            "gateway.http2.keep_alive_interval",
            "{interval}: {err}"
        );
    }
    for interval in ["1ms", "30s", "24h"] {
        let server = format!("http2 = {{ keep_alive_interval = \"{interval}\" }}");
        GatewayConfig::from_toml_str(&config(&server, "", "")).unwrap();
    }
}

/// `client_ipv6_prefix = 0` keys every IPv6 client by `::/0`: one bucket of each
/// per-client limit for the whole IPv6 Internet, so one client spending its quota locks
/// out every other IPv6 client of the route. Only more than 128 bits was refused.
#[tokio::test]
async fn a_zero_bit_ipv6_client_prefix_is_refused() {
    let err = refusal(&config("client_ipv6_prefix = 0", "", "")).await;
    assert_eq!(err.field(), "gateway.client_ipv6_prefix", "{err}");
    for bits in [48, 56, 64, 128] {
        let server = format!("client_ipv6_prefix = {bits}");
        GatewayConfig::from_toml_str(&config(&server, "", "")).unwrap();
    }
}

/// RFC 9110 requires a field on these answers that a `[routes.fallback]` cannot carry
/// (it has a status, a body and a content type only): `206` Content-Range (§15.3.7),
/// `401` WWW-Authenticate (§15.5.2), `405` Allow (§15.5.6), `407` Proxy-Authenticate
/// (§15.5.8), `426` Upgrade (§15.5.22). They loaded, and the fallback sent them without.
#[tokio::test]
async fn a_fallback_status_whose_required_field_it_cannot_send_is_refused() {
    for status in [206, 401, 405, 407, 426] {
        let route = format!("fallback = {{ status = {status}, body = '{{}}' }}");
        let err = refusal(&config("", &route, "")).await;
        assert_eq!(err.field(), "routes[0].fallback.status", "{status}: {err}");
    }
    for status in [200, 404, 429, 503] {
        let route = format!("fallback = {{ status = {status}, body = '{{}}' }}");
        GatewayConfig::from_toml_str(&config("", &route, "")).unwrap();
    }
}

/// A static instance at the unspecified address (`0.0.0.0`, `[::]`, as a listen address
/// is written) is not an address to connect to, as port 0 is not (refused): RFC 1122
/// §3.2.1.3 forbids it as a destination, and Linux connects it to the gateway's own host,
/// so a copied listen address silently sent the route's traffic to whatever listens
/// locally on that port.
#[tokio::test]
async fn an_instance_at_the_unspecified_address_is_refused() {
    for instance in ["0.0.0.0:9001", "[::]:9001"] {
        let services = format!("[[services]]\nname = \"zero\"\ninstances = [\"{instance}\"]\n");
        let err = refusal(&config("", "", &services)).await;
        assert_eq!(err.field(), "services[1].instances[0]", "{instance}: {err}");
    }
}

/// `on_missing = "reject"` answers `400` to a request without the key header (the docs
/// of `ClientLimitSettings::on_missing`, `OnMissing::Reject` and `HeaderKey`): an empty
/// value (`X-Api-Key:`) is no key either. It must be refused as a missing one, not
/// admitted to the upstream, keyless, under a bucket of its own (the key `""`).
#[tokio::test]
async fn an_empty_key_header_is_refused_as_a_missing_one() {
    let up = super::raw_http::heads_upstream(|_| "ok".to_owned()).await;
    let toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         [routes.rate_limit]\nper_client = {{ per_second = 100, key = \"header:x-api-key\", on_missing = \"reject\" }}\n\
         [[services]]\nname = \"up\"\ninstances = [\"{}\"]\n",
        up.addr
    );
    let gw = super::spawn_gateway(&toml).await;
    let send =
        |extra: &'static str| super::raw_http::request(gw.local_addr(), "GET", "/api/x", extra);
    assert_eq!(
        send("").await.0,
        400,
        "no key header: refused, as documented"
    );
    assert_eq!(send("x-api-key: key-1\r\n").await.0, 200, "a key: served");
    up.clear();
    for extra in ["x-api-key:\r\n", "x-api-key: \r\n"] {
        let (status, body) = send(extra).await;
        assert_eq!(
            status, 400,
            "{extra:?} is no key, but was answered {status} {body}"
        );
    }
    assert!(
        up.seen().is_empty(),
        "reached the upstream without a key: {:#?}",
        up.seen()
    );
}

/// A key header sent twice is no key: keyed on the first value, a client sending a fresh
/// first key with every request had a new bucket each time, while an upstream reading
/// the last value (as most do) authenticated it with its real key: the per-key limit
/// passed at will. Refused under `on_missing = "reject"`, as a missing key is.
#[tokio::test]
async fn a_repeated_key_header_is_refused_as_a_missing_one() {
    let up = super::raw_http::heads_upstream(|_| "ok".to_owned()).await;
    let toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         [routes.rate_limit]\nper_client = {{ per_second = 1, burst = 1, key = \"header:x-api-key\", on_missing = \"reject\" }}\n\
         [[services]]\nname = \"up\"\ninstances = [\"{}\"]\n",
        up.addr
    );
    let gw = super::spawn_gateway(&toml).await;
    let addr = gw.local_addr();
    let send = |extra: String| async move {
        super::raw_http::request(addr, "GET", "/api/x", &extra).await
    };
    assert_eq!(
        send("x-api-key: real\r\n".into()).await.0,
        200,
        "the key's one token"
    );
    assert_eq!(
        send("x-api-key: real\r\n".into()).await.0,
        429,
        "the key's limit"
    );
    up.clear();
    for fresh in 0..3 {
        let (status, body) = send(format!("x-api-key: fresh-{fresh}\r\nx-api-key: real\r\n")).await;
        assert_eq!(status, 400, "two keys, answered {status} {body}");
    }
    assert!(
        up.seen().is_empty(),
        "reached the upstream past the key's limit: {:#?}",
        up.seen()
    );
}

/// An HTTP/1.1 upstream on `addr` that answers every request `200` with `name`.
async fn named_upstream(listener: tokio::net::TcpListener, name: &'static str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
                            name.len()
                        );
                        if stream.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let mut chunk = [0u8; 4096];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
}

/// `instances = ["10.0.0.7:8080", "10.0.0.8:8080"]`: two hosts serving on the same port,
/// the commonest way to list a service's replicas. Each is an endpoint of its own,
/// balanced, with its own breaker and figures; neither may silently replace the other.
#[tokio::test]
async fn static_instances_on_different_hosts_with_one_port_are_two_endpoints() {
    // The same port on 127.0.0.1 and 127.0.0.2 (Linux routes all of 127/8 to loopback).
    let (a, b) = loop {
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = tokio::net::TcpListener::bind(("127.0.0.2", port)).await {
            break (a, b);
        }
    };
    let (addr_a, addr_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    named_upstream(a, "a").await;
    named_upstream(b, "b").await;
    let toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
         [routes.balance]\nstrategy = \"round-robin\"\n\
         [[services]]\nname = \"up\"\ninstances = [\"{addr_a}\", \"{addr_b}\"]\n"
    );
    let gw = super::spawn_gateway(&toml).await;
    let mut served = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..10 {
        let (status, body) = super::raw_http::get(gw.local_addr(), "/api/x").await;
        assert_eq!(status, 200, "{body}");
        *served.entry(body).or_default() += 1;
    }
    let endpoints: Vec<String> = gw.gateway().status().routes[0]
        .endpoints
        .iter()
        .map(|e| format!("{} {}", e.key, e.address))
        .collect();
    assert_eq!(
        endpoints.len(),
        2,
        "endpoints: {endpoints:?}; served: {served:?}"
    );
    assert_eq!(
        served.len(),
        2,
        "served by: {served:?}; endpoints: {endpoints:?}"
    );
}

/// "Every value the gateway's build would refuse is refused at load" (the gateway's
/// module docs; SECURITY.md: "typos: every value is checked when the configuration
/// loads"). A limit kept in Redis can refill at most one token a microsecond (the Redis
/// limiter's builder refuses a faster quota), but a `per_second` above 1 000 000 with
/// `policy = "redis"` loaded: a configuration checked in CI with `from_file` then failed
/// to build at deploy.
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_redis_limit_the_build_refuses_is_refused_at_load() {
    let redis = "[redis]\nurl = \"redis://127.0.0.1:6379/\"\n";
    for (limit, field) in [
        (
            "global = { per_second = 2000000, policy = \"redis\" }",
            "routes[0].rate_limit.global.per_second",
        ),
        (
            "per_client = { per_second = 2000000, policy = \"redis\" }",
            "routes[0].rate_limit.per_client.per_second",
        ),
    ] {
        let toml = config("", &format!("rate_limit = {{ {limit} }}"), redis);
        let err = match GatewayConfig::from_toml_str(&toml) {
            Err(e) => e,
            Ok(config) => {
                let built = Gateway::build(config, Discovery::Static).await;
                panic!(
                    "{limit}: loaded; the build then says: {:?}",
                    built.err().map(|e| e.to_string())
                );
            }
        };
        assert_eq!(err.field(), field, "{limit}: {err}");
    }
    // Failing open, each replica's local share of a limit must make a quota too: one
    // token a second shared down to 1e-8 is one every three years.
    let toml = config(
        "",
        "rate_limit = { global = { per_second = 1, policy = \"redis\" } }",
        &format!("{redis}local_share = 1e-8\n"),
    );
    match GatewayConfig::from_toml_str(&toml) {
        Err(e) => assert_eq!(e.field(), "redis.local_share", "{e}"),
        Ok(config) => panic!(
            "local_share = 1e-8: loaded; the build then says: {:?}",
            Gateway::build(config, Discovery::Static)
                .await
                .err()
                .map(|e| e.to_string())
        ),
    }
    // At one token a microsecond, it loads and builds.
    let toml = config(
        "",
        "rate_limit = { global = { per_second = 1000000, policy = \"redis\" } }",
        redis,
    );
    Gateway::build(
        GatewayConfig::from_toml_str(&toml).unwrap(),
        Discovery::Static,
    )
    .await
    .unwrap();
}

/// SECURITY.md: "A request without the header is limited by its client IP by default
/// (`on_missing = "ip"`), never left unlimited silently." A per-client limit keyed on the
/// request id header (`key = "header:x-request-id"`, the default `request_id_header`)
/// saw the fresh id the gateway makes for a request without one: a client that sent none
/// had a new bucket with every request, unlimited, and `on_missing` (`"ip"`, `"reject"`)
/// was silently ignored. Such a key (or `traceparent` while the gateway makes it) is
/// refused at load, naming it; a header the gateway does not make loads and limits.
#[tokio::test]
async fn a_limit_keyed_on_a_header_the_gateway_makes_is_refused_at_load() {
    let up = super::raw_http::heads_upstream(|_| "ok".to_owned()).await;
    let toml = |gateway: &str, key: &str, on_missing: &str| {
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\n{gateway}\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\n\
             [routes.rate_limit]\nper_client = {{ per_second = 1, burst = 1, \
             key = \"header:{key}\", on_missing = \"{on_missing}\" }}\n\
             [[services]]\nname = \"up\"\ninstances = [\"{}\"]\n",
            up.addr
        )
    };
    for (gateway, key) in [
        ("", "x-request-id"),
        ("", "X-Request-Id"),
        (
            "request_id_header = \"x-correlation-id\"\n",
            "x-correlation-id",
        ),
        ("", "traceparent"),
    ] {
        for on_missing in ["ip", "reject"] {
            let e = GatewayConfig::from_toml_str(&toml(gateway, key, on_missing))
                .expect_err(&format!("{gateway}key = header:{key}"));
            assert_eq!(e.field(), "routes[0].rate_limit.per_client.key", "{e}");
        }
    }
    // Headers the gateway does not make: three requests without one from one address
    // are limited by it (`on_missing = "ip"`) or refused.
    for (gateway, key, on_missing, expected) in [
        (
            "request_id_header = \"x-correlation-id\"\n",
            "x-request-id",
            "ip",
            [200, 429, 429],
        ),
        (
            "request_id_header = \"\"\n",
            "x-request-id",
            "reject",
            [400, 400, 400],
        ),
        (
            "trace_context = false\n",
            "traceparent",
            "ip",
            [200, 429, 429],
        ),
    ] {
        let config = GatewayConfig::from_toml_str(&toml(gateway, key, on_missing))
            .unwrap_or_else(|e| panic!("{gateway}key = header:{key}: {e}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = Gateway::build(config, Discovery::Static)
            .await
            .unwrap()
            .spawn(listener);
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let (status, _) = super::raw_http::request(gw.local_addr(), "GET", "/api/x", "").await;
            statuses.push(status);
        }
        assert_eq!(
            statuses, expected,
            "{gateway}key {key}, on_missing = {on_missing}"
        );
        gw.shutdown().await;
    }
}
