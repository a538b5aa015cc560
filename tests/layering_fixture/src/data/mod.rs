use crate::train::{
    Trainer, // data -> train, inside a multi-line group
};
pub struct Batch;
