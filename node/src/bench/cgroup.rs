//! A memory cgroup for one benchmark process: so `bench fedavg --memory-limit` can show a
//! member finishing a job with a model larger than the memory it is allowed, the way an
//! operator would cap it (`systemd-run -p MemoryMax=`, a container's limit). The limit counts
//! the page cache the process fills, as the kernel does for a container; what the process
//! writes to disk is reclaimed from it under the limit.
//!
//! cgroup v2 (`memory.max`) where the unified hierarchy has the memory controller, else v1
//! (`memory.limit_in_bytes`); a machine with neither refuses the option, saying so. Needs
//! root (CI runs as root). The group is removed when dropped.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// A memory cgroup made for one process.
pub struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    /// Makes group `name` with a limit of `bytes`.
    pub fn create(name: &str, bytes: u64) -> anyhow::Result<Self> {
        let root = Path::new("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"));
        let (dir, limit_file) = match v2 {
            true => (root.join(name), "memory.max"),
            false if root.join("memory/memory.limit_in_bytes").exists() => {
                (root.join("memory").join(name), "memory.limit_in_bytes")
            }
            false => bail!("--memory-limit: this machine has no memory cgroup controller (v1 or v2)"),
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("--memory-limit: creating the cgroup {} (needs root)", dir.display()))?;
        let group = Self { dir, v2 };
        std::fs::write(group.dir.join(limit_file), bytes.to_string())
            .with_context(|| format!("--memory-limit: setting {limit_file} of {}", group.dir.display()))?;
        Ok(group)
    }

    /// The file a process's pid is written to, to move it into the group.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// The most memory the group was charged at once (page cache included), when the kernel
    /// says.
    pub fn peak_bytes(&self) -> Option<u64> {
        let file = match self.v2 {
            true => "memory.peak",
            false => "memory.max_usage_in_bytes",
        };
        std::fs::read_to_string(self.dir.join(file)).ok()?.trim().parse().ok()
    }

    /// How often the group hit its limit (and the kernel reclaimed from it).
    pub fn limit_hits(&self) -> Option<u64> {
        match self.v2 {
            true => std::fs::read_to_string(self.dir.join("memory.events"))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("max ")?.trim().parse().ok()),
            false => std::fs::read_to_string(self.dir.join("memory.failcnt"))
                .ok()?
                .trim()
                .parse()
                .ok(),
        }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Empty once its process has ended; a group that is not stays, named in the log.
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!(cgroup = %self.dir.display(), error = %e, "could not remove the benchmark's cgroup");
        }
    }
}
