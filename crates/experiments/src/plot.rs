//! Plots: FID against the number of sampling steps, and loss curves.
