//! Data sets that flowmap reads.
pub mod idx;
pub mod image_folder;
pub mod latents;
pub mod source;
