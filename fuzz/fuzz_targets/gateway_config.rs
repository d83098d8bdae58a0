//! Loading a gateway configuration is total on any text: no panic. And an error never
//! shows the JWT secret: the input is fuzzed text around an `[auth.jwt]` section whose
//! `secret = "..."` line holds a known secret, and the error's text must not contain it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seawall::gateway::GatewayConfig;

/// Long and unusual enough never to be in an error by chance.
const SECRET: &str = "Zx81-fuzz-secret-QpL0vW7mN3";

fuzz_target!(|input: (&str, &str, u8)| {
    let (before, after, style) = input;
    // Arbitrary text alone.
    let _ = GatewayConfig::from_toml_str(before);

    let line = match style % 4 {
        0 => format!("secret = \"{SECRET}\""),
        1 => format!("secret = '{SECRET}'"),
        2 => format!("secret = \"\"\"{SECRET}\"\"\""),
        _ => format!("secret = \"{SECRET}\" {after}"),
    };
    let text = format!("{before}\n[auth.jwt]\n{line}\n{after}");
    let Err(e) = GatewayConfig::from_toml_str(&text) else {
        return;
    };
    // The property holds where the secret is only on its own line: fuzzed text could
    // open a multi-line string that swallows it into another key's value, or repeat it.
    let checkable = ![before, after]
        .iter()
        .any(|t| t.contains("\"\"\"") || t.contains("'''") || t.contains(&SECRET[..8]));
    if checkable {
        let shown = e.to_string();
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(!format!("{e:?}").contains(SECRET), "{e:?}");
    }
});
