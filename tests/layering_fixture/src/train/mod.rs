mod a;
mod b;
pub struct Trainer;
use crate::data::Batch;
