//! Evaluation: how noise becomes samples ([`sampling`]), FID/KID ([`fid`]), the [`evaluator`]
//! behind `[eval]` and `flowmap fid`, the ADM suite ([`adm`], `flowmap evaluate`), sample export
//! (PNG grids and safetensors; ADM `.npz` batches, [`npz_export`]), image grids, the AMED
//! predictor of a run ([`amed_weights`]) and optimised time grids ([`optimized_grid`]).
pub mod adm;
pub mod amed_weights;
pub mod evaluator;
pub mod fid;
pub mod image_grid;
pub mod npz_export;
pub mod optimized_grid;
pub mod sample_export;
pub mod sampling;
