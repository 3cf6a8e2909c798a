//! Raw bytes → the gateway's two text inputs, neither of which may panic on anything:
//! Kubernetes manifests (the files source: YAML/JSON documents → model → compiled
//! snapshot, first from the documents of the input's first half and then from all of it, so
//! the compiler's incremental path runs on the second) and the gateway config (parse and
//! validate, then the reload comparison against itself and the lab config).
#![no_main]

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::OnceLock;

use control::compiler::{CompileOptions, Compiler};
use control::config::Config;
use libfuzzer_sys::fuzz_target;

fn options() -> CompileOptions {
    CompileOptions {
        node_port_addresses: vec![Ipv4Addr::new(192, 0, 2, 1)],
        // Small tables: the fuzzer is after the parsing and compiling, not Maglev's fill.
        maglev_table_size: 131,
        service_cidr: Some("10.96.0.0/12".parse().expect("prefix")),
        ..CompileOptions::default()
    }
}

fuzz_target!(|data: &[u8]| {
    // Both readings of every input, so the repository's manifests and configs are seeds
    // as they are (`make fuzz` passes configs/ and configs/lab/).
    let text = String::from_utf8_lossy(data);
    // The first model: the documents before the first separator past the middle.
    let middle = (0..=text.len() / 2)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let cut = text[middle..]
        .find("\n---")
        .map_or(middle, |at| middle + at);
    let mut compiler = Compiler::new(options());
    let first = control::manifests::load_str(Path::new("fuzz-a.yaml"), &text[..cut]);
    let _ = compiler.compile(&first.model);
    let all = control::manifests::load_str(Path::new("fuzz-b.yaml"), &text);
    let compiled = compiler.compile(&all.model);
    let _ = compiled.warnings.len();
    if let Ok(config) = Config::parse(&text, "fuzz.yaml") {
        let _ = control::reload::needs_restart(&config, &config);
        let _ = control::reload::effective(&config, &config);
        if let Some(lab) = lab() {
            let _ = control::reload::needs_restart(lab, &config);
            let _ = control::reload::effective(lab, &config);
        }
    }
});

/// The lab config, parsed once.
fn lab() -> Option<&'static Config> {
    static LAB: OnceLock<Option<Config>> = OnceLock::new();
    LAB.get_or_init(|| Config::parse(include_str!("../../configs/lab.yaml"), "lab.yaml").ok())
        .as_ref()
}
