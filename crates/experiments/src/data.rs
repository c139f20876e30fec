//! Data sets that flowmap reads.
pub mod idx;
