//! Shared pieces of the serde config style (style.md §5).
use serde::{Deserialize, Serialize};

/// Stand-in for "no parameters" that still rejects unknown keys.
///
/// Internally tagged enums must not have unit variants: a unit variant silently ignores the
/// remaining keys of its table (serde issues #2123 and #2294), so `kind = "linear"` plus a typo
/// would deserialise. A newtype variant around this struct rejects the typo.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}
