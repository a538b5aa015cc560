// backend -> model: an op that knows its caller.
use crate::model::Model;
pub fn gemm(_m: &Model) {}
