//! ADM sample and reference batches: `.npz` files whose `arr_0` is uint8 (N, H, W, 3) images and
//! whose optional `arr_1` holds the N class labels (openai/guided-diffusion `evaluations/` and
//! `scripts/image_sample.py`; DiT `sample_ddp.py` writes the same). A reference batch may also hold
//! `mu`, `sigma`, `mu_s`, `sigma_s` ([`super::reference_batch`]).
//!
//! Both directions stream: [`ImageArrayReader`] reads `arr_0` a chunk of rows at a time (stored or
//! deflated zip entries), and [`BatchWriter`] writes `arr_0` from chunks into an uncompressed zip64
//! entry (what `np.savez` writes), so 50k 256×256 images (9.8 GB) never sit in memory.
use anyhow::{bail, ensure, Context, Result};
use npyz::zip::{self, CompressionMethod, ZipArchive};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The parsed header of an `.npy` member.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyHeader {
    /// numpy dtype string, e.g. `|u1`, `<i8`
    pub descr: String,
    pub fortran_order: bool,
    pub shape: Vec<u64>,
}

impl NpyHeader {
    /// The header bytes (format 1.0, padded so the data starts at a multiple of 64).
    pub fn encode(&self) -> Vec<u8> {
        let shape = match self.shape.len() {
            1 => format!("({},)", self.shape[0]),
            _ => format!("({})", self.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
        };
        let mut dict = format!("{{'descr': '{}', 'fortran_order': {}, 'shape': {shape}, }}", self.descr, if self.fortran_order { "True" } else { "False" });
        let unpadded = 10 + dict.len() + 1;
        dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
        dict.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        out.extend_from_slice(dict.as_bytes());
        out
    }

    /// Reads the magic, version and header dictionary of an `.npy` stream.
    fn read(r: &mut impl Read) -> Result<Self> {
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).context("reading the .npy magic")?;
        ensure!(&magic[..6] == b"\x93NUMPY", "not an .npy member (bad magic)");
        let len = match magic[6] {
            1 => {
                let mut b = [0u8; 2];
                r.read_exact(&mut b)?;
                u16::from_le_bytes(b) as usize
            }
            2 | 3 => {
                let mut b = [0u8; 4];
                r.read_exact(&mut b)?;
                u32::from_le_bytes(b) as usize
            }
            v => bail!(".npy format version {v} is not supported"),
        };
        let mut dict = vec![0u8; len];
        r.read_exact(&mut dict)?;
        let dict = String::from_utf8_lossy(&dict).to_string();
        let field = |key: &str| -> Result<&str> {
            let at = dict.find(&format!("'{key}'")).with_context(|| format!("the .npy header has no `{key}`: {dict}"))?;
            Ok(dict[at + key.len() + 2..].trim_start().trim_start_matches(':').trim_start())
        };
        let descr = field("descr")?.trim_start_matches('\'').split('\'').next().unwrap_or_default().to_string();
        let fortran_order = field("fortran_order")?.starts_with("True");
        let shape_text = field("shape")?;
        let shape_text = &shape_text[1..shape_text.find(')').context("unterminated shape")?];
        let shape = shape_text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.trim_end_matches('L').parse::<u64>().with_context(|| format!("bad shape `{shape_text}`"))).collect::<Result<Vec<_>>>()?;
        Ok(Self { descr, fortran_order, shape })
    }
}

/// A member `<name>.npy` of an `.npz`, opened for sequential reading after its header.
pub struct NpyMember {
    pub header: NpyHeader,
    reader: Box<dyn Read + Send>,
}

impl NpyMember {
    /// Opens `<name>.npy` in `path`; `Ok(None)` when the archive has no such member.
    pub fn open(path: &Path, name: &str) -> Result<Option<Self>> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut archive = ZipArchive::new(BufReader::new(file)).with_context(|| format!("{} is not an .npz (zip) file", path.display()))?;
        let (start, size, method) = match archive.by_name(&format!("{name}.npy")) {
            Ok(member) => (member.data_start(), member.compressed_size(), member.compression()),
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {name}.npy in {}", path.display())),
        };
        let mut file = File::open(path)?;
        file.seek(SeekFrom::Start(start))?;
        let raw = BufReader::with_capacity(1 << 20, file).take(size);
        let mut reader: Box<dyn Read + Send> = match method {
            CompressionMethod::Stored => Box::new(raw),
            CompressionMethod::Deflated => Box::new(BufReader::with_capacity(1 << 20, flate2::read::DeflateDecoder::new(raw))),
            m => bail!("{name}.npy in {} is compressed with {m:?}; only stored and deflated members are read", path.display()),
        };
        let header = NpyHeader::read(&mut reader).with_context(|| format!("{name}.npy in {}", path.display()))?;
        Ok(Some(Self { header, reader }))
    }

    /// The whole array as int64 values (labels: any little-endian integer dtype).
    pub fn read_i64(mut self) -> Result<Vec<i64>> {
        let n: u64 = self.header.shape.iter().product();
        let width: usize = self.header.descr[2..].parse().with_context(|| format!("dtype {}", self.header.descr))?;
        let signed = self.header.descr.as_bytes().get(1) == Some(&b'i');
        ensure!(matches!(self.header.descr.as_bytes().first(), Some(b'<' | b'|')) && (signed || self.header.descr.as_bytes().get(1) == Some(&b'u')), "labels must be little-endian integers, got dtype {}", self.header.descr);
        let mut bytes = vec![0u8; n as usize * width];
        self.reader.read_exact(&mut bytes)?;
        Ok(bytes
            .chunks(width)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..width].copy_from_slice(c);
                let v = u64::from_le_bytes(b);
                match signed && width < 8 && c[width - 1] & 0x80 != 0 {
                    true => (v | (!0u64 << (8 * width))) as i64, // sign-extend
                    false => v as i64,
                }
            })
            .collect())
    }
}

/// `arr_0` of a batch: uint8 (N, H, W, C) images, C = 3 (or 1), read in chunks of rows.
pub struct ImageArrayReader {
    member: NpyMember,
    pub num: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    read: usize,
}

impl ImageArrayReader {
    /// Opens `arr_0` of `path`; errors say what the ADM evaluator expects.
    pub fn open(path: &Path) -> Result<Self> {
        let member = NpyMember::open(path, "arr_0")?.with_context(|| format!("{} has no `arr_0` (ADM batches hold uint8 (N, H, W, 3) images there)", path.display()))?;
        let h = &member.header;
        ensure!(h.descr == "|u1", "{}: `arr_0` has dtype {}, expected uint8 (|u1)", path.display(), h.descr);
        ensure!(!h.fortran_order, "{}: `arr_0` is in Fortran order; expected C order", path.display());
        ensure!(h.shape.len() == 4 && matches!(h.shape[3], 1 | 3), "{}: `arr_0` has shape {:?}, expected (N, H, W, 3)", path.display(), h.shape);
        let (num, height, width, channels) = (h.shape[0] as usize, h.shape[1] as usize, h.shape[2] as usize, h.shape[3] as usize);
        Ok(Self { member, num, height, width, channels, read: 0 })
    }

    fn row_bytes(&self) -> usize {
        self.height * self.width * self.channels
    }

    pub fn remaining(&self) -> usize {
        self.num - self.read
    }

    /// The next `n` rows (fewer at the end) as uint8 (n, H, W, C); None when all were read.
    pub fn next_u8(&mut self, n: usize) -> Result<Option<Tensor>> {
        let n = n.min(self.remaining());
        if n == 0 {
            return Ok(None);
        }
        let mut bytes = vec![0u8; n * self.row_bytes()];
        self.member.reader.read_exact(&mut bytes).with_context(|| format!("reading rows {}..{} of arr_0", self.read, self.read + n))?;
        self.read += n;
        Ok(Some(Tensor::from_slice(&bytes).reshape([n as i64, self.height as i64, self.width as i64, self.channels as i64])))
    }

    /// The next `n` rows as images in [−1, 1] (n, C, H, W) Float (u8/127.5 − 1, which
    /// [`crate::eval::fid::quantize`] maps back to the same bytes).
    pub fn next_images(&mut self, n: usize) -> Result<Option<Tensor>> {
        Ok(self.next_u8(n)?.map(|u| u.permute([0, 3, 1, 2]).to_kind(Kind::Float) / 127.5 - 1.0))
    }

    /// Skips `n` rows (reads and drops them: a deflated member cannot seek).
    pub fn skip(&mut self, n: usize) -> Result<()> {
        let mut left = n.min(self.remaining()) * self.row_bytes();
        let mut buf = vec![0u8; left.min(16 << 20)];
        while left > 0 {
            let take = left.min(buf.len());
            self.member.reader.read_exact(&mut buf[..take])?;
            left -= take;
        }
        self.read += n.min(self.remaining());
        Ok(())
    }
}

/// The labels `arr_1` of a batch, if it has them.
pub fn read_labels(path: &Path) -> Result<Option<Vec<i64>>> {
    NpyMember::open(path, "arr_1")?.map(|m| m.read_i64().with_context(|| format!("reading arr_1 of {}", path.display()))).transpose()
}

/// Images as an ADM batch expects them: uint8 (N, H, W, 3) on the CPU from generator output in
/// [−1, 1] (N, C, H, W) (C = 1 is repeated to 3 channels), quantised as DiT's `sample_ddp.py`.
pub fn to_hwc_u8(images: &Tensor) -> Tensor {
    let q = crate::eval::fid::quantize(&images.to_device(Device::Cpu));
    let q = if q.size()[1] == 1 { q.repeat([1, 3, 1, 1]) } else { q };
    q.permute([0, 2, 3, 1]).contiguous()
}

/// Writes an ADM batch: `arr_0` (N, H, W, 3) uint8 from chunks, then `arr_1` (N,) int64 labels if
/// any, into an uncompressed zip64 `.npz` (numpy reads it with `np.load`). The caller gives N up
/// front; [`BatchWriter::finish`] checks that exactly N rows came.
pub struct BatchWriter<W: Write + Seek> {
    zip: zip::ZipWriter<W>,
    shape: [u64; 4],
    written: u64,
}

/// Uncompressed zip64 members with a fixed timestamp, so the same rows give the same bytes.
fn stored() -> zip::write::FileOptions {
    zip::write::FileOptions::default().compression_method(CompressionMethod::Stored).large_file(true).last_modified_time(zip::DateTime::default())
}

impl<W: Write + Seek> BatchWriter<W> {
    /// Starts `arr_0` of shape (num, height, width, 3).
    pub fn new(out: W, num: u64, height: u64, width: u64) -> Result<Self> {
        let mut zip = zip::ZipWriter::new(out);
        zip.start_file("arr_0.npy", stored())?;
        let shape = [num, height, width, 3];
        zip.write_all(&NpyHeader { descr: "|u1".into(), fortran_order: false, shape: shape.to_vec() }.encode())?;
        Ok(Self { zip, shape, written: 0 })
    }

    /// Appends uint8 (n, H, W, 3) rows.
    pub fn write_rows(&mut self, rows: &Tensor) -> Result<()> {
        let s = rows.size();
        ensure!(rows.kind() == Kind::Uint8 && s.len() == 4 && s[1..] == [self.shape[1] as i64, self.shape[2] as i64, 3], "rows must be uint8 (n, {}, {}, 3), got {:?} {s:?}", self.shape[1], self.shape[2], rows.kind());
        ensure!(self.written + s[0] as u64 <= self.shape[0], "more than the announced {} rows", self.shape[0]);
        let bytes: Vec<u8> = Vec::try_from(rows.contiguous().reshape([-1]))?;
        self.zip.write_all(&bytes)?;
        self.written += s[0] as u64;
        Ok(())
    }

    /// Ends `arr_0`, writes `arr_1` (when labels are given: N of them) and the zip directory.
    pub fn finish(mut self, labels: Option<&[i64]>) -> Result<W> {
        ensure!(self.written == self.shape[0], "wrote {} of {} rows", self.written, self.shape[0]);
        if let Some(labels) = labels {
            ensure!(labels.len() as u64 == self.shape[0], "{} labels for {} images", labels.len(), self.shape[0]);
            self.zip.start_file("arr_1.npy", stored())?;
            self.zip.write_all(&NpyHeader { descr: "<i8".into(), fortran_order: false, shape: vec![labels.len() as u64] }.encode())?;
            let bytes: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.zip.write_all(&bytes)?;
        }
        let mut out = self.zip.finish()?;
        out.flush()?;
        Ok(out)
    }
}

/// Writes a whole batch held in memory (tests, small sets) atomically.
pub fn write_batch(path: &Path, images_u8_hwc: &Tensor, labels: Option<&[i64]>) -> Result<()> {
    let s = images_u8_hwc.size();
    ensure!(s.len() == 4 && s[3] == 3, "images must be uint8 (N, H, W, 3), got {s:?}");
    crate::run::atomic_file::write_atomic_with(path, |file| {
        let mut w = BatchWriter::new(BufWriter::new(file), s[0] as u64, s[1] as u64, s[2] as u64)?;
        w.write_rows(images_u8_hwc)?;
        w.finish(labels)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_is_64_aligned() {
        for shape in [vec![5u64], vec![50_000, 256, 256, 3]] {
            let h = NpyHeader { descr: "|u1".into(), fortran_order: false, shape };
            let bytes = h.encode();
            assert_eq!(bytes.len() % 64, 0);
            assert_eq!(NpyHeader::read(&mut bytes.as_slice()).unwrap(), h);
        }
    }

    #[test]
    fn a_batch_streams_back_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.npz");
        let x = Tensor::arange(7 * 4 * 5 * 3, (Kind::Int64, Device::Cpu)).remainder(251).to_kind(Kind::Uint8).reshape([7, 4, 5, 3]);
        write_batch(&path, &x, Some(&[3, -1, 0, 9, 2, 2, 1])).unwrap();
        let mut r = ImageArrayReader::open(&path).unwrap();
        assert_eq!((r.num, r.height, r.width, r.channels), (7, 4, 5, 3));
        let a = r.next_u8(3).unwrap().unwrap();
        r.skip(1).unwrap();
        let b = r.next_u8(10).unwrap().unwrap();
        assert!(r.next_u8(1).unwrap().is_none());
        assert!(a.equal(&x.narrow(0, 0, 3)) && b.equal(&x.narrow(0, 4, 3)));
        assert_eq!(read_labels(&path).unwrap().unwrap(), vec![3, -1, 0, 9, 2, 2, 1]);
    }
}
