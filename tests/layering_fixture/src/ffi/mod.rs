use crate::model::internal; // ffi -> a non-pub item
use crate::model::Block;    // fine: public, re-exported
