//! Identity keys on disk: a libp2p ed25519 keypair in its protobuf encoding.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use libp2p::identity::Keypair;

/// Writes a fresh key to `out` (refusing to overwrite unless `force`) and prints its PeerId.
pub fn keygen(out: &Path, force: bool) -> anyhow::Result<()> {
    if out.exists() && !force {
        bail!("{} already exists; pass --force to overwrite it", out.display());
    }
    let key = Keypair::generate_ed25519();
    write_key(out, &key)?;
    println!("{}", key.public().to_peer_id());
    Ok(())
}

/// Writes `key` with mode 0600.
pub fn write_key(out: &Path, key: &Keypair) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = key.to_protobuf_encoding().context("encoding the key")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("writing {}", out.display()))?;
    f.write_all(&bytes)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Reads a key written by [`keygen`].
pub fn load_key(path: &Path) -> anyhow::Result<Keypair> {
    let bytes = std::fs::read(path).with_context(|| format!("reading key {}", path.display()))?;
    Keypair::from_protobuf_encoding(&bytes).with_context(|| {
        format!(
            "{} is not a flare-node key (made by `flare-node keygen`)",
            path.display()
        )
    })
}
