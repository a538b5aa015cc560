use super::a::A;
pub struct B;
#[cfg(test)]
mod tests {
    use crate::backend::cpu::gemm; // unit tests may reach anywhere
}
