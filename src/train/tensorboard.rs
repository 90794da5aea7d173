//! TensorBoard event files, written without TensorFlow: TFRecord framing
//! (length, masked CRC32C of the length, an `Event` protobuf, masked CRC32C
//! of the data) over the few messages of `proto/tensorboard.proto`. The
//! first record carries `file_version: "brain.Event:2"`; every later one a
//! `Summary` of scalars (`simple_value`) at a step.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use sharedmoe::train::tensorboard::EventWriter;
//! let mut w = EventWriter::create(std::path::Path::new("runs/exp1/tb"))?;
//! w.scalar("train/loss", 0, 10.4)?;
//! w.write_row(&serde_json::json!({"step": 1, "loss": 9.8, "val_loss": 9.9}))?;
//! w.flush()?;
//! # Ok(()) }
//! ```

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use prost::Message;

/// The prost messages generated from `proto/tensorboard.proto`.
pub mod tb_proto {
    include!(concat!(env!("OUT_DIR"), "/tensorboard.rs"));
}

use tb_proto::{event, summary, Event, Summary};

/// The `file_version` of the first event: what TensorBoard expects.
pub const FILE_VERSION: &str = "brain.Event:2";

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), one byte at a time
/// through a 256-entry table built at compile time.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The CRC as TFRecord stores it: rotated right by 15 bits plus a constant.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: u64 LE length, masked CRC of those 8 bytes, the data,
/// masked CRC of the data.
pub fn tfrecord(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The TensorBoard tag of a metrics-row key: `val_loss` is `val/loss`,
/// everything else `train/<key>`.
pub fn row_tag(key: &str) -> String {
    if key == "val_loss" {
        "val/loss".to_string()
    } else {
        format!("train/{key}")
    }
}

/// Appends scalar events to a new `events.out.tfevents.*` file in a
/// directory. Buffered: call [`EventWriter::flush`] to make them visible
/// (dropping the writer flushes too, ignoring errors).
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` if needed and a new file
    /// `events.out.tfevents.<unix secs>.<hostname>.<pid>.<n>` in it (`n` is
    /// 0 unless a file of that name exists already), holding the
    /// `file_version` event.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".to_string());
        let pid = std::process::id();
        let mut n = 0u32;
        let (file, path) = loop {
            let path = dir.join(format!("events.out.tfevents.{secs}.{host}.{pid}.{n}"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        };
        let mut w = EventWriter {
            out: BufWriter::new(file),
            path,
        };
        w.event(&Event {
            wall_time: now_secs(),
            step: 0,
            what: Some(event::What::FileVersion(FILE_VERSION.to_string())),
        })?;
        w.flush()?;
        Ok(w)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn event(&mut self, e: &Event) -> Result<()> {
        self.out
            .write_all(&tfrecord(&e.encode_to_vec()))
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn scalars(&mut self, step: i64, values: Vec<(String, f64)>) -> Result<()> {
        let value = values
            .into_iter()
            .map(|(tag, v)| summary::Value {
                tag,
                value: Some(summary::value::Value::SimpleValue(v as f32)),
            })
            .collect();
        self.event(&Event {
            wall_time: now_secs(),
            step,
            what: Some(event::What::Summary(Summary { value })),
        })
    }

    /// One scalar (stored as f32, as TensorBoard's `simple_value` is).
    pub fn scalar(&mut self, tag: &str, step: i64, value: f64) -> Result<()> {
        self.scalars(step, vec![(tag.to_string(), value)])
    }

    /// A row of `metrics.jsonl` (a JSON object with an integer `step`):
    /// every numeric field but `step` as `train/<key>`, `val_loss` as
    /// `val/loss`, at the row's step, in one event. Nulls and other
    /// non-numbers (`mfu` without a peak) are skipped.
    pub fn write_row(&mut self, row: &serde_json::Value) -> Result<()> {
        let Some(obj) = row.as_object() else {
            bail!("metrics row is not a JSON object: {row}");
        };
        let Some(step) = obj.get("step").and_then(|s| s.as_i64()) else {
            bail!("metrics row has no integer `step`: {row}");
        };
        let values: Vec<(String, f64)> = obj
            .iter()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| v.as_f64().map(|x| (row_tag(k), x)))
            .collect();
        if values.is_empty() {
            return Ok(());
        }
        self.scalars(step, values)
    }

    /// Writes what is buffered through to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("flushing {}", self.path.display()))
    }
}

/// The records of a TFRecord file, each checked against its CRCs, up to
/// the first torn or corrupt one (a writer killed mid-record leaves one);
/// the second value says whether the file ended there cleanly.
pub fn read_records(bytes: &[u8]) -> (Vec<&[u8]>, bool) {
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let mut out = vec![];
    let mut i = 0;
    while i < bytes.len() {
        if i + 12 > bytes.len() {
            return (out, false);
        }
        let len_bytes = &bytes[i..i + 8];
        if u32_at(i + 8) != masked_crc32c(len_bytes) {
            return (out, false);
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|l| (i + 12).checked_add(l))
            .filter(|&e| e + 4 <= bytes.len())
        else {
            return (out, false);
        };
        let data = &bytes[i + 12..end];
        if u32_at(end) != masked_crc32c(data) {
            return (out, false);
        }
        out.push(data);
        i = end + 4;
    }
    (out, true)
}

/// Drops the scalars at or after `step` from every event file in `dir`
/// (an interrupted run's steps that are trained again from a checkpoint),
/// so each step has one value, as in `metrics.jsonl`. Files are rewritten
/// atomically, and only when something goes; a torn last record goes too.
pub fn rewind(dir: &Path, step: i64) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let path = e.path();
        if !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("events.out.tfevents."))
        {
            continue;
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let (records, clean) = read_records(&bytes);
        let kept: Vec<&[u8]> = records
            .iter()
            .copied()
            .filter(|r| match Event::decode(*r) {
                Ok(ev) => ev.step < step || matches!(ev.what, Some(event::What::FileVersion(_))),
                Err(_) => false,
            })
            .collect();
        if clean && kept.len() == records.len() {
            continue;
        }
        let mut out = Vec::with_capacity(bytes.len());
        for r in kept {
            out.extend(tfrecord(r));
        }
        let tmp = path.with_extension("rewind.tmp");
        std::fs::write(&tmp, out).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
    }
    Ok(())
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        // RFC 3720 (iSCSI) B.4.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        let dec: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(crc32c(&dec), 0x113F_DB5C);
    }

    /// Bit-at-a-time CRC32C, independent of the table above.
    fn crc32c_bitwise(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }

    fn unmask(m: u32) -> u32 {
        let r = m.wrapping_sub(0xa282_ead8);
        r.rotate_left(15)
    }

    /// A minimal TFRecord reader: every record's length and data, checked
    /// against their CRCs.
    fn read_records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let mut out = vec![];
        let mut i = 0;
        while i < bytes.len() {
            assert!(i + 12 <= bytes.len(), "truncated header at {i}");
            let len_bytes = &bytes[i..i + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(
                unmask(u32_at(i + 8)),
                crc32c_bitwise(len_bytes),
                "length crc at {i}"
            );
            let data = &bytes[i + 12..i + 12 + len];
            assert_eq!(
                unmask(u32_at(i + 12 + len)),
                crc32c_bitwise(data),
                "data crc at {i}"
            );
            out.push(data.to_vec());
            i += 12 + len + 4;
        }
        out
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sharedmoe-tb-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// The mask exactly as TFRecord's spec writes it, against ours.
    #[test]
    #[allow(clippy::manual_rotate)]
    fn mask_matches_the_spec() {
        for data in [&b""[..], b"a", b"123456789", &[0xffu8; 100]] {
            let crc = crc32c_bitwise(data);
            let spec = ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8);
            assert_eq!(masked_crc32c(data), spec);
            assert_eq!(unmask(spec), crc);
        }
    }

    #[test]
    fn writes_readable_records() {
        let dir = scratch("records");
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalar("train/loss", 3, 2.5).unwrap();
        w.scalar("x", -1, 1e-3).unwrap();
        w.write_row(&serde_json::json!({
            "step": 7, "loss": 4.25, "aux": 0.01, "lr": 3e-4, "grad_norm": 1.5,
            "tokens": 4096, "step_time_s": 0.2, "tokens_per_s": 20480.0,
            "mfu": null, "val_loss": 4.5
        }))
        .unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert!(
            name.ends_with(&format!(".{}.0", std::process::id())),
            "{name}"
        );
        // A second writer in the same second gets its own file.
        let w2 = EventWriter::create(&dir).unwrap();
        assert_ne!(w2.path(), path);

        let records = read_records(&std::fs::read(&path).unwrap());
        let events: Vec<Event> = records
            .iter()
            .map(|r| Event::decode(r.as_slice()).unwrap())
            .collect();
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[0].what,
            Some(event::What::FileVersion("brain.Event:2".into()))
        );
        assert!(events[0].wall_time > 1.6e9);
        let scalars = |e: &Event| -> Vec<(String, f32)> {
            match &e.what {
                Some(event::What::Summary(s)) => s
                    .value
                    .iter()
                    .map(|v| match v.value {
                        Some(summary::value::Value::SimpleValue(x)) => (v.tag.clone(), x),
                        None => panic!("no simple_value"),
                    })
                    .collect(),
                other => panic!("not a summary: {other:?}"),
            }
        };
        assert_eq!(events[1].step, 3);
        assert_eq!(scalars(&events[1]), vec![("train/loss".to_string(), 2.5)]);
        assert_eq!(events[2].step, -1);
        assert_eq!(scalars(&events[2]), vec![("x".to_string(), 1e-3f32)]);
        assert_eq!(events[3].step, 7);
        let mut row = scalars(&events[3]);
        row.sort_by(|a, b| a.0.cmp(&b.0));
        let want: Vec<(String, f32)> = [
            ("train/aux", 0.01f32),
            ("train/grad_norm", 1.5),
            ("train/loss", 4.25),
            ("train/lr", 3e-4),
            ("train/step_time_s", 0.2),
            ("train/tokens", 4096.0),
            ("train/tokens_per_s", 20480.0),
            ("val/loss", 4.5),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        assert_eq!(row, want);
        assert!(events.iter().all(|e| e.wall_time >= events[0].wall_time));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_rows_without_step() {
        let dir = scratch("bad-rows");
        let mut w = EventWriter::create(&dir).unwrap();
        assert!(w.write_row(&serde_json::json!({"loss": 1.0})).is_err());
        assert!(w.write_row(&serde_json::json!([1, 2])).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
