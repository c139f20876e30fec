//! When periodic work happens: "every N steps, and at the last step".
//!
//! One rule for logging, sample grids, checkpoints and in-training evaluation, so the four
//! cadences of a run cannot drift apart.

/// Work done every `every` steps (0 = never periodically) and, if `at_end`, at the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    pub every: u64,
    pub at_end: bool,
}

impl Cadence {
    /// Every `every` steps and at the end (`every = 0`: only at the end).
    pub fn every_and_at_end(every: u64) -> Self {
        Self { every, at_end: true }
    }

    /// Whether the work is due after `step` steps of a run of `total` steps.
    pub fn due(&self, step: u64, total: u64) -> bool {
        (self.every > 0 && step.is_multiple_of(self.every)) || (self.at_end && step == total)
    }
}

#[cfg(test)]
mod tests {
    use super::Cadence;

    #[test]
    fn every_n_and_at_the_end() {
        let c = Cadence::every_and_at_end(4);
        let due: Vec<u64> = (1..=10).filter(|&s| c.due(s, 10)).collect();
        assert_eq!(due, vec![4, 8, 10]);
        let end_only = Cadence::every_and_at_end(0);
        assert_eq!((1..=10).filter(|&s| end_only.due(s, 10)).collect::<Vec<_>>(), vec![10]);
        let never_at_end = Cadence { every: 3, at_end: false };
        assert_eq!((1..=10).filter(|&s| never_at_end.due(s, 10)).collect::<Vec<_>>(), vec![3, 6, 9]);
    }
}
