//! Data sets that flowmap reads.
pub mod idx;
pub mod source;
