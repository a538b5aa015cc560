// model -> backend::cpu, written as an inline path rather than a `use`.
pub struct Block;
pub fn forward() {
    crate::backend::cpu::gemm(&super::Model);
    // "crate::train::fake" in a string, and this comment, are not arrows.
    let _ = "crate::train::fake";
}
