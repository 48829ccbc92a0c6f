//! Length-prefixed frames: `u32` big-endian length, then that many bytes.
//!
//! The length is checked against the caller's cap *before* any buffer is allocated, so a peer
//! that announces a 4 GiB frame costs us four bytes of reading, not four gigabytes of memory.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Serialize, de::DeserializeOwned};

/// Largest `/flare/ctl/1` frame, request or response: control messages are small by design
/// (models never travel in them, only references).
pub const MAX_CTL_FRAME: u32 = 1 << 20;

/// Why a frame or its content could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The announced length exceeds the cap for this kind of frame.
    #[error("frame of {len} bytes exceeds the cap of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// Cap in force.
        max: u64,
    },
    /// The frame names a protocol version this node does not speak.
    #[error("unsupported protocol version {got} (this node speaks {supported})")]
    UnsupportedVersion {
        /// Version received.
        got: u16,
        /// Version spoken here.
        supported: u16,
    },
    /// The bytes are not a valid message of this protocol.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The stream ended or failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Whether the stream ended cleanly before any byte of a frame.
    pub fn is_eof(&self) -> bool {
        matches!(self, FrameError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof)
    }
}

impl From<FrameError> for std::io::Error {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(io) => io,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}

/// Reads one frame of at most `max` bytes.
pub async fn read_frame<R: AsyncRead + Unpin>(io: &mut R, max: u32) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len);
    if len > max {
        return Err(FrameError::TooLarge {
            len: len.into(),
            max: max.into(),
        });
    }
    let mut buf = vec![0u8; len as usize];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes one frame (does not flush).
pub async fn write_frame<W: AsyncWrite + Unpin>(io: &mut W, bytes: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(bytes.len()).map_err(|_| FrameError::TooLarge {
        len: bytes.len() as u64,
        max: u32::MAX.into(),
    })?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    Ok(())
}

/// Encodes `value` as `version (u16 BE) || CBOR`.
pub fn encode_versioned<T: Serialize>(version: u16, value: &T) -> Vec<u8> {
    let mut out = version.to_be_bytes().to_vec();
    // Writing CBOR into a Vec only fails for types serde cannot describe, which ours are not.
    if let Err(e) = ciborium::into_writer(value, &mut out) {
        unreachable!("CBOR encoding into memory failed: {e}");
    }
    out
}

/// Decodes `version (u16 BE) || CBOR`, rejecting other versions and trailing bytes.
pub fn decode_versioned<T: DeserializeOwned>(version: u16, bytes: &[u8]) -> Result<T, FrameError> {
    let (v, body) = bytes
        .split_first_chunk::<2>()
        .ok_or_else(|| FrameError::Malformed("frame shorter than its version field".into()))?;
    let got = u16::from_be_bytes(*v);
    if got != version {
        return Err(FrameError::UnsupportedVersion {
            got,
            supported: version,
        });
    }
    let mut cursor = std::io::Cursor::new(body);
    let value: T = ciborium::de::from_reader_with_recursion_limit(&mut cursor, 64)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if cursor.position() != body.len() as u64 {
        return Err(FrameError::Malformed("trailing bytes after message".into()));
    }
    Ok(value)
}

/// Reads a frame of at most `max` bytes and decodes it as a versioned CBOR message.
pub async fn read_message<R: AsyncRead + Unpin, T: DeserializeOwned>(
    io: &mut R,
    version: u16,
    max: u32,
) -> Result<T, FrameError> {
    let bytes = read_frame(io, max).await?;
    decode_versioned(version, &bytes)
}

/// Encodes and writes a versioned CBOR message as one frame (does not flush).
pub async fn write_message<W: AsyncWrite + Unpin, T: Serialize>(
    io: &mut W,
    version: u16,
    value: &T,
) -> Result<(), FrameError> {
    write_frame(io, &encode_versioned(version, value)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    #[test]
    fn cap_is_checked_before_allocating() {
        let mut bytes: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        let e = block_on(read_frame(&mut bytes, 1024)).expect_err("too large");
        assert!(matches!(
            e,
            FrameError::TooLarge {
                len: 0xffff_ffff,
                max: 1024
            }
        ));
    }

    #[test]
    fn version_and_trailing_bytes_are_checked() {
        let mut enc = encode_versioned(1, &42u32);
        assert_eq!(decode_versioned::<u32>(1, &enc).expect("ok"), 42);
        assert!(matches!(
            decode_versioned::<u32>(2, &enc),
            Err(FrameError::UnsupportedVersion { got: 1, supported: 2 })
        ));
        enc.push(0);
        assert!(matches!(
            decode_versioned::<u32>(1, &enc),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode_versioned::<u32>(1, &[1]),
            Err(FrameError::Malformed(_))
        ));
    }
}
