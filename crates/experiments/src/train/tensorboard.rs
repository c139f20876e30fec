//! A TensorBoard event-file writer (scalars and PNG images), no protobuf dependency.
//!
//! Record framing: u64 length (LE) | u32 masked crc32c(length) | payload | u32 masked crc32c(payload),
//! masked = ((crc >> 15) | (crc << 17)) + 0xa282ead8. Payloads are `Event` protos: wall_time (1,
//! double), step (2, int64), file_version (3, string) or summary (5): Summary.value (1) with tag
//! (1), simple_value (2, float) or image (4: height 1, width 2, colorspace 3, encoded PNG 4).
use anyhow::{Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::Path;

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u32, wire: u32, out: &mut Vec<u8>) {
    varint(((field << 3) | wire) as u64, out);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn event(step: Option<i64>, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    key(1, 1, &mut e);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    e.extend_from_slice(&now.to_le_bytes());
    if let Some(s) = step {
        key(2, 0, &mut e);
        varint(s as u64, &mut e);
    }
    body(&mut e);
    e
}

pub struct EventWriter {
    file: File,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<unix time>.<host>` and writes the version record.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{ts}.{host}"));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self { file };
        w.record(&event(None, |e| bytes_field(3, b"brain.Event:2", e)))?;
        Ok(w)
    }

    fn record(&mut self, payload: &[u8]) -> Result<()> {
        let len = (payload.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(payload.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(payload);
        buf.extend_from_slice(&masked_crc(payload).to_le_bytes());
        self.file.write_all(&buf)?;
        self.file.flush()?;
        Ok(())
    }

    pub fn scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        let mut v = Vec::new();
        bytes_field(1, tag.as_bytes(), &mut v);
        key(2, 5, &mut v);
        v.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        bytes_field(1, &v, &mut summary);
        self.record(&event(Some(step), |e| bytes_field(5, &summary, e)))
    }

    /// A PNG image (`png` holds the encoded bytes).
    pub fn image(&mut self, tag: &str, png: &[u8], height: u32, width: u32, channels: u32, step: i64) -> Result<()> {
        let mut img = Vec::new();
        key(1, 0, &mut img);
        varint(height as u64, &mut img);
        key(2, 0, &mut img);
        varint(width as u64, &mut img);
        key(3, 0, &mut img);
        varint(channels as u64, &mut img);
        bytes_field(4, png, &mut img);
        let mut v = Vec::new();
        bytes_field(1, tag.as_bytes(), &mut v);
        bytes_field(4, &img, &mut v);
        let mut summary = Vec::new();
        bytes_field(1, &v, &mut summary);
        self.record(&event(Some(step), |e| bytes_field(5, &summary, e)))
    }
}

/// Parses the records of an event file back into payloads, checking both CRCs (used by tests).
pub fn read_records(path: &Path) -> Result<Vec<Vec<u8>>> {
    let data = std::fs::read(path)?;
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        anyhow::ensure!(i + 12 <= data.len(), "{}: truncated record header", path.display());
        let len_bytes = &data[i..i + 8];
        let len = u64::from_le_bytes(len_bytes.try_into()?) as usize;
        anyhow::ensure!(u32::from_le_bytes(data[i + 8..i + 12].try_into()?) == masked_crc(len_bytes), "{}: bad length CRC", path.display());
        let payload = &data[i + 12..i + 12 + len];
        anyhow::ensure!(u32::from_le_bytes(data[i + 12 + len..i + 16 + len].try_into()?) == masked_crc(payload), "{}: bad payload CRC", path.display());
        out.push(payload.to_vec());
        i += 16 + len;
    }
    Ok(out)
}
