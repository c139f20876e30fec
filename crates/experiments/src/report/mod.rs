//! Reports over finished runs: the objective-by-steps [`table`] and the [`plot`]s.
pub mod plot;
pub mod table;
pub mod table_jobs;
