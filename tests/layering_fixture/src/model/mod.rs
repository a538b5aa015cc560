mod block;
pub use block::Block;
// Allowed: the model sees the trait.
use crate::backend::Backend;
pub struct Model;
pub(crate) fn internal() {}
