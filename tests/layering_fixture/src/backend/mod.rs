pub mod cpu;
pub trait Backend {}
