//! [`DataSource`]: what the training loop reads batches from, and its implementations: [`InMemory`]
//! (MNIST, Fashion-MNIST, reflow pairs), image folders ([`FolderReader`]) and cached latents
//! ([`LatentReader`]). The `[data]` table that chooses one is [`crate::data::config::DataConfig`].
use super::image_folder::FolderReader;
use super::latents::LatentReader;
use anyhow::Result;
use tch::{Device, Tensor};

/// A source of training batches.
pub trait DataSource {
    /// Items (images or latent rows) one epoch draws from.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Classes the labels range over (0 when unconditional).
    fn num_classes(&self) -> i64;
    /// Shape of one training sample, e.g. [1, 32, 32], [3, 256, 256], [4, 32, 32].
    fn sample_shape(&self) -> Vec<i64>;
    /// One line for the log.
    fn describe(&self) -> String;
    /// Starts preparing the coming batches, each given as (draw key, indices) (a hint; the key is
    /// what [`DataSource::batch`] will be called with, see [`crate::run::rng::draw_key`]).
    fn prefetch(&mut self, _upcoming: &[(u64, Vec<i64>)]) {}
    /// How many batches ahead [`DataSource::prefetch`] wants.
    fn prefetch_depth(&self) -> usize {
        0
    }
    /// The batch of `indices` for the draw key `key` (the step, with the micro-batch index above
    /// it: [`crate::run::rng::draw_key`]): (x, class) on `device`. A pure function of (data,
    /// indices, key, seed), so a resumed run, and any split of the batch over ranks, reads the same.
    fn batch(&mut self, indices: &[i64], key: u64, device: Device) -> Result<(Tensor, Tensor)>;
    /// The stored noise of each row when the data are (noise, sample) couplings (reflow pairs).
    fn coupled_noise(&mut self, _indices: &[i64], _device: Device) -> Option<Tensor> {
        None
    }
    /// Unreadable files skipped so far (image folders).
    fn skipped(&self) -> usize {
        0
    }
}

/// MNIST / Fashion-MNIST in memory.
pub struct InMemory {
    pub images: Tensor,
    pub labels: Tensor,
    /// (N, ...) noise coupled to each image (reflow pairs), or None for independent data.
    pub noise: Option<Tensor>,
    pub num_classes: i64,
    pub name: String,
}

impl DataSource for InMemory {
    fn len(&self) -> usize {
        self.images.size()[0] as usize
    }
    fn num_classes(&self) -> i64 {
        self.num_classes
    }
    fn sample_shape(&self) -> Vec<i64> {
        self.images.size()[1..].to_vec()
    }
    fn describe(&self) -> String {
        format!("{}: {} images in memory", self.name, self.len())
    }
    fn batch(&mut self, indices: &[i64], _step: u64, device: Device) -> Result<(Tensor, Tensor)> {
        let idx = Tensor::from_slice(indices);
        Ok((self.images.index_select(0, &idx).to_device(device), self.labels.index_select(0, &idx).to_device(device)))
    }
    fn coupled_noise(&mut self, indices: &[i64], device: Device) -> Option<Tensor> {
        self.noise.as_ref().map(|n| n.index_select(0, &Tensor::from_slice(indices)).to_device(device))
    }
}

impl DataSource for FolderReader {
    fn len(&self) -> usize {
        self.folder.len()
    }
    fn num_classes(&self) -> i64 {
        if self.null_class.is_some() {
            0
        } else {
            self.folder.num_classes()
        }
    }
    fn sample_shape(&self) -> Vec<i64> {
        vec![3, self.size as i64, self.size as i64]
    }
    fn describe(&self) -> String {
        format!("image folder {} ({}): {} images, {} classes, {}² center crop, flip {}", self.folder.root.display(), self.folder.layout.name(), self.folder.len(), self.folder.num_classes(), self.size, self.flip)
    }
    fn prefetch(&mut self, upcoming: &[(u64, Vec<i64>)]) {
        FolderReader::prefetch(self, upcoming)
    }
    fn prefetch_depth(&self) -> usize {
        self.depth()
    }
    fn batch(&mut self, indices: &[i64], key: u64, device: Device) -> Result<(Tensor, Tensor)> {
        FolderReader::batch(self, indices, key, device)
    }
    fn skipped(&self) -> usize {
        self.skips.count()
    }
}

impl DataSource for LatentReader {
    fn len(&self) -> usize {
        LatentReader::len(self)
    }
    fn num_classes(&self) -> i64 {
        if self.null_class.is_some() {
            0
        } else {
            self.manifest.num_classes()
        }
    }
    fn sample_shape(&self) -> Vec<i64> {
        self.manifest.latent_shape.clone()
    }
    fn describe(&self) -> String {
        let m = &self.manifest;
        format!(
            "latents {} ({} rows from {}, {:?} latents {:?} of {}² crops, flips stored {}, {} classes, VAE sha256 {}…)",
            self.dir.display(),
            self.len(),
            m.source,
            m.dtype,
            m.latent_shape,
            m.image_size,
            m.flip,
            m.num_classes(),
            &m.vae.sha256[..m.vae.sha256.len().min(12)]
        )
    }
    fn batch(&mut self, indices: &[i64], key: u64, device: Device) -> Result<(Tensor, Tensor)> {
        LatentReader::batch(self, indices, key, device)
    }
}
