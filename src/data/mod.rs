//! Data for pretraining and fine-tuning: masking now; the dataset format, importers and the
//! augmenting loader arrive with the dataset issue.

pub mod masking;
