//! The precision a GPU run computes in: an execution setting like the device, so it lives at
//! the top (the CUDA backend computes in it; trainers, the CLI and the C API choose it).

use crate::error::{Error, Result};

/// Storage precision of a GPU run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Everything fp32: parity with the CPU pass.
    F32,
    /// bf16 activations and GEMM/attention inputs, fp32 accumulation, fp32 master weights.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" | "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => bail!(InvalidArgument, "unknown precision {other:?} (fp32 or bf16)"),
        }
    }
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}
