//! Evaluation: how noise becomes samples ([`sampling`]), FID/KID ([`fid`]), the [`evaluator`]
//! behind `[eval]` and `flowmap fid`, sample export and image grids.
pub mod evaluator;
pub mod fid;
pub mod image_grid;
pub mod sample_export;
pub mod sampling;
