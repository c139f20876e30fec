//! flowmap-models: the DiT family conditioned on (t, h, class).
