//! Evaluation: how noise becomes samples ([`sampling`]), FID/KID ([`fid`]), the [`evaluator`]
//! behind `[eval]` and `flowmap fid`, the ADM suite ([`adm`], `flowmap evaluate`), sample export
//! (PNG grids and safetensors; ADM `.npz` batches, [`npz_export`]) and image grids.
pub mod adm;
pub mod evaluator;
pub mod fid;
pub mod image_grid;
pub mod npz_export;
pub mod sample_export;
pub mod sampling;
