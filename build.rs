//! Sets the SONAME of libbeit.so on Linux: `libbeit.so.<BEIT_ABI_VERSION>`.
//!
//! The SONAME major is the C ABI version (src/ffi/version.rs), not Cargo's major: it must change
//! exactly when a compiled host could break, which is what BEIT_ABI_VERSION counts. Cargo's
//! version (0.x) may move for Rust-only changes without breaking the C ABI.

use std::fs;

fn main() {
    println!("cargo:rerun-if-changed=src/ffi/version.rs");
    println!("cargo:rerun-if-changed=build.rs");
    let source = fs::read_to_string("src/ffi/version.rs").expect("read src/ffi/version.rs");
    let abi = source
        .lines()
        .find_map(|line| {
            let rest = line.trim().strip_prefix("pub const BEIT_ABI_VERSION: u32 =")?;
            rest.trim().trim_end_matches(';').trim().parse::<u32>().ok()
        })
        .expect("src/ffi/version.rs defines no `pub const BEIT_ABI_VERSION: u32 = N;`");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" || os == "android" || os.ends_with("bsd") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libbeit.so.{abi}");
    }
}
