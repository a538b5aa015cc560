//! The deterministic random numbers of the fuzz replay tests (tests/*_fuzz.rs include this file
//! with `#[path]`): xorshift64*, dependency free, the same sequence on every machine.

pub struct Rng(pub u64);

#[allow(dead_code)] // each replay test uses its own subset
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}
