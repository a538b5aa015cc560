//! Data for pretraining and fine-tuning: BEiT's block-wise masking and a synthetic MIM task; the
//! dataset format, importers and the augmenting loader arrive with the dataset issue.

pub mod masking;
pub mod synthetic;
