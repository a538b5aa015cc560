//! Version and ABI queries: what a host linked against.

use std::ffi::c_char;

use super::status::guard_infallible;

/// The ABI version of this header and library. It changes only when a compiled host could
/// break: a function removed or changed, a struct field moved. Adding functions, enum values or
/// fields at the end of versioned structs (see `struct_size`) does not change it, with one
/// exception: a struct that a `*_default()` function returns by value is returned in registers
/// up to 16 bytes and through a hidden pointer above that (x86-64 and AArch64 C ABIs), so
/// growing one across 16 bytes breaks every compiled caller of that function. ABI 2 is such a
/// change: `beit_context_options` grew from 16 to 24 bytes (`memory_budget`). Every versioned
/// struct is now larger than 16 bytes, so appending fields is safe again.
pub const BEIT_ABI_VERSION: u32 = 2;

/// Major version of the libbeit release this header comes from (equals Cargo's version).
pub const BEIT_VERSION_MAJOR: u32 = 0;
/// Minor version of the libbeit release this header comes from (equals Cargo's version).
pub const BEIT_VERSION_MINOR: u32 = 1;
/// Patch version of the libbeit release this header comes from (equals Cargo's version).
pub const BEIT_VERSION_PATCH: u32 = 0;

/// Parses a decimal version component at compile time.
const fn parse_decimal(s: &str) -> u32 {
    let bytes = s.as_bytes();
    assert!(!bytes.is_empty(), "empty version component");
    let mut value = 0u32;
    let mut i = 0;
    while i < bytes.len() {
        assert!(bytes[i].is_ascii_digit(), "version component is not a decimal number");
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    value
}

/// The libbeit version as "MAJOR.MINOR.PATCH" (Cargo's version), a static string: never NULL,
/// never to be freed.
#[no_mangle]
pub extern "C" fn beit_version() -> *const c_char {
    // The header macros must equal Cargo's version: bumping one without the other fails the
    // build (checked here, inside a body, where cbindgen does not look).
    const _: () = assert!(
        BEIT_VERSION_MAJOR == parse_decimal(env!("CARGO_PKG_VERSION_MAJOR"))
            && BEIT_VERSION_MINOR == parse_decimal(env!("CARGO_PKG_VERSION_MINOR"))
            && BEIT_VERSION_PATCH == parse_decimal(env!("CARGO_PKG_VERSION_PATCH")),
        "BEIT_VERSION_MAJOR/MINOR/PATCH in src/ffi/version.rs differ from Cargo.toml's version"
    );
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The ABI version of the loaded library. A host compiled against this header should check
/// `beit_abi_version() == BEIT_ABI_VERSION` at startup.
#[no_mangle]
pub extern "C" fn beit_abi_version() -> u32 {
    guard_infallible(BEIT_ABI_VERSION, || BEIT_ABI_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn version_string_is_cargos() {
        let v = unsafe { CStr::from_ptr(beit_version()) }.to_str().unwrap();
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
        assert_eq!(v, format!("{BEIT_VERSION_MAJOR}.{BEIT_VERSION_MINOR}.{BEIT_VERSION_PATCH}"));
        assert_eq!(beit_abi_version(), BEIT_ABI_VERSION);
    }
}
