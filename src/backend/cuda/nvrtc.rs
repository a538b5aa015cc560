//! Run-time compilation of the embedded kernel files with NVRTC, for the GPU present, with an
//! on-disk cache of the resulting cubins.
//!
//! The sources are the `cuda/*.cu` files build.rs embeds ([`sources`]); every embedded `.cuh` is
//! handed to NVRTC as a named header, so `#include "common.cuh"` resolves without any file on
//! disk. Toolkit headers (`cuda_bf16.h`) come from the first CUDA include directory found
//! ([`cuda_include_dirs`]). The same function ([`compile`]) serves the runtime and
//! `scripts/check-kernels` (which compiles every file for sm_80 and sm_90 on a machine without a
//! GPU), so CI checks exactly the code path a GPU run takes.
//!
//! Cache key: an FNV-1a hash over the file's source, every embedded header, the toolkit bf16/fp16
//! headers' bytes, the compile options (which name the architecture) and NVRTC's version. The
//! file name also carries the kernel file, the architecture and NVRTC's version, so a stale entry
//! is never picked up; writes go to a temporary name then rename, so concurrent processes never
//! read a half-written cubin.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::sys as nv;

use crate::error::{Error, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/cuda_sources.rs"));
}

/// Every embedded CUDA file: (file name under `cuda/`, text), sorted by name.
pub fn sources() -> &'static [(&'static str, &'static str)] {
    embedded::SOURCES
}

/// The embedded kernel files (`.cu`), which are the compilation units; headers are included.
pub fn kernel_files() -> impl Iterator<Item = &'static str> {
    sources().iter().map(|(name, _)| *name).filter(|name| name.ends_with(".cu"))
}

/// The text of an embedded file.
pub fn source(file: &str) -> Option<&'static str> {
    sources().iter().find(|(name, _)| *name == file).map(|(_, text)| *text)
}

/// A GPU architecture NVRTC compiles for, as `--gpu-architecture` spells it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Arch(pub String);

impl Arch {
    /// The architecture for a device's compute capability: the arch-specific `a` variant from
    /// Hopper on (sm_90a on H100/H200: it enables wgmma/TMA instructions that plain sm_90 code
    /// may not use); `sm_XY` before.
    pub fn for_compute_capability(major: i32, minor: i32) -> Arch {
        if major >= 9 {
            Arch(format!("sm_{major}{minor}a"))
        } else {
            Arch(format!("sm_{major}{minor}"))
        }
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

/// The result of compiling one kernel file.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub file: String,
    pub arch: Arch,
    /// The cubin (ELF) for `arch`, ready for `cuModuleLoadData`.
    pub cubin: Vec<u8>,
    /// NVRTC's log (warnings and, with `--ptxas-options=-v`, ptxas' register and spill report).
    pub log: String,
    /// Bytes of local-memory spill stores + loads ptxas reported over all kernels of the file
    /// (`None` when the log does not carry ptxas' report).
    pub spill_bytes: Option<u64>,
    /// True when the cubin came from the disk cache (then `log` is empty).
    pub from_cache: bool,
}

fn nvrtc_error(what: &str, status: nv::nvrtcResult) -> Error {
    Error::Internal(format!("NVRTC {what} failed: {status:?}"))
}

/// NVRTC's (major, minor) version; `Unsupported` when libnvrtc cannot be loaded (checked
/// first: cudarc would panic).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(nvrtc_missing());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: writes two ints.
    let status = unsafe { nv::nvrtcVersion(&mut major, &mut minor) };
    if status != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_error("nvrtcVersion", status));
    }
    Ok((major, minor))
}

/// True when libnvrtc can be loaded (never panics).
pub fn nvrtc_present() -> bool {
    std::panic::catch_unwind(|| {
        // SAFETY: dlopen attempts only.
        unsafe { nv::is_culib_present() }
    })
    .unwrap_or(false)
}

/// Directories searched for the CUDA toolkit headers, in order: `$BEIT_CUDA_INCLUDE`
/// (colon-separated), `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`.
/// Only directories holding `cuda_bf16.h` are returned.
pub fn cuda_include_dirs() -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(list) = std::env::var("BEIT_CUDA_INCLUDE") {
        candidates.extend(std::env::split_paths(&list));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(root) = std::env::var(var) {
            candidates.push(Path::new(&root).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    let mut found: Vec<PathBuf> = Vec::new();
    for dir in candidates {
        if dir.join("cuda_bf16.h").is_file() && !found.contains(&dir) {
            found.push(dir);
        }
    }
    found
}

/// The options every kernel is compiled with. No `--use_fast_math`: GELU needs the exact
/// `erff` and the fp32 parity tests need IEEE division and square root.
fn options(arch: &Arch, include_dirs: &[PathBuf]) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={}", arch.name()),
        "--std=c++17".to_string(),
        // ptxas' per-kernel register and spill report lands in the program log.
        "--ptxas-options=-v".to_string(),
    ];
    for dir in include_dirs {
        opts.push(format!("--include-path={}", dir.display()));
    }
    opts
}

/// 64-bit FNV-1a: a stable, dependency-free hash for cache keys (std's hasher may change
/// between Rust releases, which would only cost recompiles, but stable is simpler to reason about).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

fn cache_key(file: &str, src: &str, opts: &[String], include_dirs: &[PathBuf], version: (i32, i32)) -> u64 {
    let mut h = Fnv::new();
    h.write(file.as_bytes());
    h.write(src.as_bytes());
    for (name, text) in sources().iter().filter(|(name, _)| name.ends_with(".cuh")) {
        h.write(name.as_bytes());
        h.write(text.as_bytes());
    }
    if let Some(dir) = include_dirs.first() {
        for header in ["cuda_bf16.h", "cuda_bf16.hpp", "cuda_fp16.h", "cuda_fp16.hpp"] {
            h.write(&std::fs::read(dir.join(header)).unwrap_or_default());
        }
    }
    for o in opts {
        h.write(o.as_bytes());
    }
    h.write(&version.0.to_le_bytes());
    h.write(&version.1.to_le_bytes());
    h.0
}

/// Where cubins are cached: `$BEIT_CACHE_DIR`, else `$XDG_CACHE_HOME/beit/kernels`, else
/// `~/.cache/beit/kernels`; `None` when none can be named (then nothing is cached).
pub fn cache_dir() -> Option<PathBuf> {
    let nonempty = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty()).map(PathBuf::from);
    if let Some(dir) = nonempty("BEIT_CACHE_DIR") {
        return Some(dir);
    }
    if let Some(dir) = nonempty("XDG_CACHE_HOME") {
        return Some(dir.join("beit").join("kernels"));
    }
    nonempty("HOME").map(|home| home.join(".cache").join("beit").join("kernels"))
}

/// Compiles embedded `file` for `arch`, through the disk cache: a hit returns the stored cubin;
/// a miss compiles and stores (a cache that cannot be written is not an error).
pub fn compile_cached(file: &str, arch: &Arch) -> Result<Compiled> {
    let src = source(file).ok_or_else(|| Error::Internal(format!("no embedded CUDA file {file:?}")))?;
    let include_dirs = cuda_include_dirs();
    let version = nvrtc_version()?;
    let opts = options(arch, &include_dirs);
    let key = cache_key(file, src, &opts, &include_dirs, version);
    let stem = file.trim_end_matches(".cu");
    let name = format!("{stem}-{}-nvrtc{}.{}-{key:016x}.cubin", arch.name(), version.0, version.1);
    let dir = cache_dir();
    if let Some(dir) = &dir {
        if let Ok(cubin) = std::fs::read(dir.join(&name)) {
            if is_elf(&cubin) {
                return Ok(Compiled {
                    file: file.to_string(),
                    arch: arch.clone(),
                    cubin,
                    log: String::new(),
                    spill_bytes: None,
                    from_cache: true,
                });
            }
        }
    }
    let compiled = compile_with(file, src, arch, &opts)?;
    if let Some(dir) = &dir {
        store(dir, &name, &compiled.cubin);
    }
    Ok(compiled)
}

/// Compiles embedded `file` for `arch` without the cache (what `scripts/check-kernels` runs).
pub fn compile(file: &str, arch: &Arch) -> Result<Compiled> {
    let src = source(file).ok_or_else(|| Error::Internal(format!("no embedded CUDA file {file:?}")))?;
    let opts = options(arch, &cuda_include_dirs());
    compile_with(file, src, arch, &opts)
}

fn is_elf(bytes: &[u8]) -> bool {
    bytes.len() > 4 && &bytes[..4] == b"\x7fELF"
}

fn store(dir: &Path, name: &str, cubin: &[u8]) {
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    if std::fs::write(&tmp, cubin).is_ok() && std::fs::rename(&tmp, dir.join(name)).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// An NVRTC program, destroyed on drop.
struct Program(nv::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram, destroyed once.
        unsafe { nv::nvrtcDestroyProgram(&mut self.0) };
    }
}

fn nvrtc_missing() -> Error {
    Error::Unsupported(
        "NVRTC (libnvrtc.so.13) could not be loaded: install the CUDA 13 toolkit or the nvidia-cuda-nvrtc wheel and \
         put its lib directory on LD_LIBRARY_PATH"
            .into(),
    )
}

fn compile_with(file: &str, src: &str, arch: &Arch, opts: &[String]) -> Result<Compiled> {
    if !nvrtc_present() {
        return Err(nvrtc_missing());
    }
    let cstr = |s: &str| CString::new(s).map_err(|_| Error::Internal(format!("NUL byte in CUDA text of {file}")));
    let c_src = cstr(src)?;
    let c_name = cstr(file)?;
    let headers: Vec<(CString, CString)> = sources()
        .iter()
        .filter(|(name, _)| name.ends_with(".cuh"))
        .map(|(name, text)| Ok((cstr(text)?, cstr(name)?)))
        .collect::<Result<_>>()?;
    let header_texts: Vec<*const c_char> = headers.iter().map(|(t, _)| t.as_ptr()).collect();
    let header_names: Vec<*const c_char> = headers.iter().map(|(_, n)| n.as_ptr()).collect();
    let mut prog = Program(std::ptr::null_mut());
    // SAFETY: every pointer is a live NUL-terminated string owned above, for the call's duration
    // (NVRTC copies them).
    let status = unsafe {
        nv::nvrtcCreateProgram(
            &mut prog.0,
            c_src.as_ptr(),
            c_name.as_ptr(),
            headers.len() as i32,
            header_texts.as_ptr(),
            header_names.as_ptr(),
        )
    };
    if status != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_error("nvrtcCreateProgram", status));
    }
    let c_opts: Vec<CString> = opts.iter().map(|o| cstr(o)).collect::<Result<_>>()?;
    let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: a live program and live option strings.
    let status = unsafe { nv::nvrtcCompileProgram(prog.0, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    let log = program_log(&prog)?;
    if status != nv::nvrtcResult::NVRTC_SUCCESS {
        let hint = if log.contains("cuda_bf16.h") && cuda_include_dirs().is_empty() {
            "\n(no CUDA include directory with cuda_bf16.h was found: set BEIT_CUDA_INCLUDE or CUDA_HOME)"
        } else {
            ""
        };
        return Err(Error::Internal(format!(
            "NVRTC could not compile cuda/{file} for {} ({status:?}); options {opts:?}; log:\n{log}{hint}",
            arch.name()
        )));
    }
    let mut size = 0usize;
    // SAFETY: a compiled program; writes one usize.
    let status = unsafe { nv::nvrtcGetCUBINSize(prog.0, &mut size) };
    if status != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_error("nvrtcGetCUBINSize", status));
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: the buffer holds `size` bytes, as NVRTC asked.
    let status = unsafe { nv::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char) };
    if status != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_error("nvrtcGetCUBIN", status));
    }
    let spill_bytes = spill_bytes(&log);
    Ok(Compiled { file: file.to_string(), arch: arch.clone(), cubin, log, spill_bytes, from_cache: false })
}

fn program_log(prog: &Program) -> Result<String> {
    let mut size = 0usize;
    // SAFETY: a live program; writes one usize.
    let status = unsafe { nv::nvrtcGetProgramLogSize(prog.0, &mut size) };
    if status != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_error("nvrtcGetProgramLogSize", status));
    }
    let mut buf = vec![0 as c_char; size.max(1)];
    // SAFETY: the buffer holds `size` bytes (including the terminating NUL).
    let status = unsafe { nv::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr()) };
    if status != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_error("nvrtcGetProgramLog", status));
    }
    // SAFETY: NVRTC NUL-terminates the log; the buffer is at least one byte and zeroed.
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Ok(text.to_string_lossy().trim().to_string())
}

/// Sums ptxas' "N bytes spill stores, M bytes spill loads" over every kernel in the log;
/// `None` when the log has no such line (ptxas' report absent).
pub fn spill_bytes(log: &str) -> Option<u64> {
    let mut total = None;
    for line in log.lines() {
        if let Some(pos) = line.find("bytes spill stores") {
            let stores = last_number(&line[..pos]);
            let loads = line[pos..].find("bytes spill loads").map(|p| last_number(&line[pos..pos + p]));
            total = Some(total.unwrap_or(0) + stores.unwrap_or(0) + loads.flatten().unwrap_or(0));
        }
    }
    total
}

fn last_number(text: &str) -> Option<u64> {
    text.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).next_back()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_sources_include_common_header() {
        assert!(source("common.cuh").is_some_and(|s| s.contains("beit_block_sum")));
        assert!(kernel_files().count() > 0, "build.rs embedded no .cu file");
        assert!(kernel_files().all(|f| f.ends_with(".cu")));
    }

    #[test]
    fn arch_names() {
        assert_eq!(Arch::for_compute_capability(9, 0).name(), "sm_90a");
        assert_eq!(Arch::for_compute_capability(8, 6).name(), "sm_86");
        assert_eq!(Arch::for_compute_capability(8, 0).name(), "sm_80");
    }

    #[test]
    fn spill_report_parsing() {
        let log = "ptxas info    : Compiling entry function 'a' for 'sm_90'\n\
                   ptxas info    : Function properties for a\n\
                   \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Function properties for b\n\
                   \x20   16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n";
        assert_eq!(spill_bytes(log), Some(20));
        assert_eq!(spill_bytes("no report"), None);
    }

    #[test]
    fn cache_key_changes_with_arch_and_version() {
        let dirs = Vec::new();
        let a = cache_key("x.cu", "src", &options(&Arch("sm_80".into()), &dirs), &dirs, (13, 0));
        let b = cache_key("x.cu", "src", &options(&Arch("sm_90a".into()), &dirs), &dirs, (13, 0));
        let c = cache_key("x.cu", "src", &options(&Arch("sm_80".into()), &dirs), &dirs, (13, 1));
        let d = cache_key("x.cu", "src2", &options(&Arch("sm_80".into()), &dirs), &dirs, (13, 0));
        assert!(a != b && a != c && a != d && b != c);
    }
}
