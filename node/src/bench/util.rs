//! Small pieces the benchmark processes share: byte sizes, generated data, peak memory, medians.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use flare_protocols::{BlobId, ManifestBuilder};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

/// One mebibyte, the unit of every reported rate and the buffer size of the baselines.
pub const MIB: u64 = 1 << 20;

/// Parses a byte count: plain bytes (`4096`) or a number with a binary suffix `B`, `KiB`,
/// `MiB`, `GiB` or `TiB` (case-insensitive), fractions allowed (`0.5MiB`); rounded to the
/// nearest byte.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        other => bail!("unknown size unit {other:?} in {s:?} (use B, KiB, MiB, GiB or TiB)"),
    };
    let num = num.trim();
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .with_context(|| format!("size {s:?} does not fit in 64 bits"));
    }
    let x: f64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a size (e.g. 4096, 0.5MiB, 1GiB)"))?;
    let bytes = (x * mult as f64).round();
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        bail!("size {s:?} is out of range");
    }
    Ok(bytes as u64)
}

/// A human-readable byte count (`1.00 GiB`).
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", UNITS[u])
    }
}

/// MiB per second, or 0 when no time was measured.
pub fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / MIB as f64 / secs
    } else {
        0.0
    }
}

/// The median of `xs` (the mean of the middle two for an even count); 0 for none.
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// This process's peak resident set size (`VmHWM` in `/proc/self/status`), in bytes.
pub fn peak_rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM line in /proc/self/status")?;
    let kib: u64 = line
        .trim()
        .strip_suffix("kB")
        .context("VmHWM is not in kB")?
        .trim()
        .parse()
        .with_context(|| format!("VmHWM value {line:?}"))?;
    Ok(kib * 1024)
}

/// CPU time a process has used, all threads together, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cpu {
    /// In user space.
    pub user: f64,
    /// In the kernel (system calls, page faults, the page cache, TCP).
    pub sys: f64,
}

impl Cpu {
    /// This process's CPU time so far (`utime` and `stime` of `/proc/self/stat`, in clock
    /// ticks of 1/100 s: Linux's `USER_HZ`, fixed by its ABI).
    pub fn now() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
        // The command name may contain spaces; the fields after it may not.
        let rest = stat.rsplit_once(')').context("no ')' in /proc/self/stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields are numbered from 1 and `rest` starts at field 3; utime is 14, stime 15.
        let tick = |i: usize| -> anyhow::Result<f64> {
            let v: u64 = fields
                .get(i - 3)
                .context("/proc/self/stat is too short")?
                .parse()
                .context("/proc/self/stat field")?;
            Ok(v as f64 / 100.0)
        };
        Ok(Self {
            user: tick(14)?,
            sys: tick(15)?,
        })
    }

    /// The CPU time used since `earlier`.
    pub fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user - earlier.user,
            sys: self.sys - earlier.sys,
        }
    }
}

/// `len` pseudo-random bytes from a seeded fast PRNG, produced as they are read: memory use
/// is the caller's buffer, whatever `len`. Reading fails once `cancel` is set.
pub struct PrngReader {
    rng: SmallRng,
    left: u64,
    cancel: Arc<AtomicBool>,
}

impl PrngReader {
    /// A reader of `len` bytes from `seed`.
    pub fn new(len: u64, seed: u64, cancel: Arc<AtomicBool>) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
            left: len,
            cancel,
        }
    }
}

impl Read for PrngReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("benchmark cancelled"));
        }
        let n = usize::try_from(self.left).unwrap_or(usize::MAX).min(buf.len());
        self.rng.fill_bytes(&mut buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// Re-hashes bytes written to it into a fresh [`ManifestBuilder`], one chunk buffered at a
/// time, so a blob read back from a store can be named independently of the store.
pub struct HashingWriter {
    builder: ManifestBuilder,
    buf: Vec<u8>,
    chunk_size: usize,
}

impl HashingWriter {
    /// A writer that cuts its input into chunks of `chunk_size`.
    pub fn new(chunk_size: u32) -> anyhow::Result<Self> {
        Ok(Self {
            builder: ManifestBuilder::new(chunk_size).context("chunk size")?,
            buf: Vec::with_capacity(chunk_size as usize),
            chunk_size: chunk_size as usize,
        })
    }

    /// The id of everything written, and its length.
    pub fn finish(mut self) -> anyhow::Result<(BlobId, u64)> {
        if !self.buf.is_empty() {
            self.builder.push_chunk(&self.buf);
        }
        let m = self.builder.finish().context("naming the re-read blob")?;
        Ok((m.id(), m.len))
    }
}

impl std::io::Write for HashingWriter {
    fn write(&mut self, mut data: &[u8]) -> std::io::Result<usize> {
        let n = data.len();
        while !data.is_empty() {
            let take = (self.chunk_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == self.chunk_size {
                self.builder.push_chunk(&self.buf);
                self.buf.clear();
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("10B").ok(), Some(10));
        assert_eq!(parse_size("1KiB").ok(), Some(1024));
        assert_eq!(parse_size("256MiB").ok(), Some(256 << 20));
        assert_eq!(parse_size("1GiB").ok(), Some(1 << 30));
        assert_eq!(parse_size("1 gib").ok(), Some(1 << 30));
        assert_eq!(parse_size("0.5MiB").ok(), Some(512 << 10));
        assert_eq!(parse_size("1.5GiB").ok(), Some(3 << 29));
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("-1MiB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn prng_reader_is_deterministic_and_exact() -> anyhow::Result<()> {
        let read = |seed| -> anyhow::Result<Vec<u8>> {
            let mut out = Vec::new();
            PrngReader::new(3000, seed, Arc::default()).read_to_end(&mut out)?;
            Ok(out)
        };
        let a = read(7)?;
        assert_eq!(a.len(), 3000);
        assert_eq!(a, read(7)?);
        assert_ne!(a, read(8)?);
        let cancel = Arc::new(AtomicBool::new(true));
        assert!(PrngReader::new(10, 1, cancel).read(&mut [0u8; 4]).is_err());
        Ok(())
    }

    #[test]
    fn hashing_writer_names_the_blob_like_a_manifest() -> anyhow::Result<()> {
        let data: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        let want = flare_protocols::Manifest::of_bytes(&data, 1000)?;
        let mut w = HashingWriter::new(1000)?;
        for piece in data.chunks(333) {
            w.write_all(piece)?;
        }
        assert_eq!(w.finish()?, (want.id(), 2500));
        Ok(())
    }

    #[test]
    fn peak_rss_and_cpu_are_readable() -> anyhow::Result<()> {
        assert!(peak_rss_bytes()? > 0);
        let a = Cpu::now()?;
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let d = Cpu::now()?.since(a);
        assert!(d.user >= 0.0 && d.sys >= 0.0);
        Ok(())
    }
}
