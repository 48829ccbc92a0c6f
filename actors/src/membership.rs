//! The consortium's member table: who may connect, and where to find them.
//!
//! The same `[[member]]` table appears in a members file and in topology files:
//! ```toml
//! [[member]]
//! name = "site-1"
//! peer_id = "12D3KooW..."
//! addrs = ["/ip4/127.0.0.1/tcp/4101"]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use libp2p::{Multiaddr, PeerId};
use serde::Deserialize;

/// One consortium member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Human name, unique in the table.
    pub name: String,
    /// The member's identity (its ed25519 public key).
    pub peer_id: PeerId,
    /// Where it listens; may be empty when it only dials out.
    pub addrs: Vec<Multiaddr>,
}

/// Why a member table could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is invalid or a field has a bad value; the message names line and field.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, where.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    name: String,
    peer_id: toml::Spanned<String>,
    #[serde(default)]
    addrs: Vec<toml::Spanned<String>>,
}

#[derive(Deserialize)]
struct RawTable {
    #[serde(default)]
    member: Vec<toml::Spanned<RawMember>>,
}

/// The member table, keyed by peer id.
#[derive(Clone, Debug, Default)]
pub struct Members {
    by_peer: BTreeMap<PeerId, Member>,
}

impl Members {
    /// An empty table (nobody may connect).
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a table from members; a later duplicate peer id replaces an earlier one.
    pub fn from_members(members: impl IntoIterator<Item = Member>) -> Self {
        Self {
            by_peer: members.into_iter().map(|m| (m.peer_id, m)).collect(),
        }
    }

    /// Loads the `[[member]]` table of a TOML file (other tables are ignored, so a topology
    /// file works too).
    pub fn load(path: &Path) -> Result<Self, MembersError> {
        let text = std::fs::read_to_string(path).map_err(|source| MembersError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| MembersError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses the `[[member]]` table of TOML text; the error names line and field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawTable = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        let line_of =
            |span: std::ops::Range<usize>| text.as_bytes().iter().take(span.start).filter(|&&b| b == b'\n').count() + 1;
        let mut out = Self::new();
        let mut names = BTreeMap::new();
        for m in raw.member {
            let line = line_of(m.span());
            let m = m.into_inner();
            let peer_id: PeerId = m.peer_id.get_ref().parse().map_err(|e| {
                format!(
                    "line {}: member {:?}: field `peer_id`: {:?} is not a peer id ({e})",
                    line_of(m.peer_id.span()),
                    m.name,
                    m.peer_id.get_ref()
                )
            })?;
            let mut addrs = Vec::new();
            for a in &m.addrs {
                addrs.push(a.get_ref().parse::<Multiaddr>().map_err(|e| {
                    format!(
                        "line {}: member {:?}: field `addrs`: {:?} is not a multiaddr ({e})",
                        line_of(a.span()),
                        m.name,
                        a.get_ref()
                    )
                })?);
            }
            if let Some(prev) = names.insert(m.name.clone(), line) {
                return Err(format!(
                    "line {line}: field `name`: member {:?} is already defined on line {prev}",
                    m.name
                ));
            }
            if out.by_peer.contains_key(&peer_id) {
                return Err(format!("line {line}: field `peer_id`: {peer_id} is listed twice"));
            }
            out.by_peer.insert(
                peer_id,
                Member {
                    name: m.name,
                    peer_id,
                    addrs,
                },
            );
        }
        Ok(out)
    }

    /// Adds or replaces a member.
    pub fn insert(&mut self, m: Member) {
        self.by_peer.insert(m.peer_id, m);
    }

    /// Whether `peer` is a member.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.by_peer.contains_key(peer)
    }

    /// The member with this peer id.
    pub fn get(&self, peer: &PeerId) -> Option<&Member> {
        self.by_peer.get(peer)
    }

    /// The member with this name.
    pub fn by_name(&self, name: &str) -> Option<&Member> {
        self.by_peer.values().find(|m| m.name == name)
    }

    /// All members, ordered by peer id.
    pub fn iter(&self) -> impl Iterator<Item = &Member> {
        self.by_peer.values()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.by_peer.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_peer.is_empty()
    }

    /// The table as TOML, in the format [`Members::parse`] reads.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for m in self.iter() {
            let addrs: Vec<String> = m.addrs.iter().map(|a| format!("{:?}", a.to_string())).collect();
            out.push_str(&format!(
                "[[member]]\nname = {:?}\npeer_id = \"{}\"\naddrs = [{}]\n\n",
                m.name,
                m.peer_id,
                addrs.join(", ")
            ));
        }
        out
    }
}

/// A member table nodes can share: every node of a `sim` reads the one table instead of a
/// copy each (5,000 members would otherwise mean 25 million entries, and as many updates
/// once the addresses are known). A node of its own holds a table nobody else does.
#[derive(Clone, Debug, Default)]
pub struct MemberTable(std::sync::Arc<std::sync::RwLock<Members>>);

impl MemberTable {
    /// A table holding `members`, shared by this handle's clones only.
    pub fn new(members: Members) -> Self {
        Self(std::sync::Arc::new(std::sync::RwLock::new(members)))
    }

    /// Adds a member or updates its addresses, for every node sharing the table.
    pub fn insert(&self, m: Member) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).insert(m);
    }

    /// Whether `peer` is a member.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.read().contains(peer)
    }

    /// The member with this peer id.
    pub fn get(&self, peer: &PeerId) -> Option<Member> {
        self.read().get(peer).cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Members> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl From<Members> for MemberTable {
    fn from(m: Members) -> Self {
        Self::new(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        let a = PeerId::random();
        let b = PeerId::random();
        let text = format!(
            "[[member]]\nname = \"a\"\npeer_id = \"{a}\"\naddrs = [\"/ip4/127.0.0.1/tcp/4101\"]\n\n[[member]]\nname = \"b\"\npeer_id = \"{b}\"\n"
        );
        let m = Members::parse(&text).expect("parse");
        assert_eq!(m.len(), 2);
        assert_eq!(m.by_name("a").map(|x| x.addrs.len()), Some(1));
        let again = Members::parse(&m.to_toml()).expect("reparse");
        assert_eq!(again.get(&b).map(|x| x.name.as_str()), Some("b"));
    }

    #[test]
    fn errors_name_line_and_field() {
        let text = "[[member]]\nname = \"a\"\npeer_id = \"nope\"\n";
        let e = Members::parse(text).expect_err("bad peer id");
        assert!(e.contains("line 3") && e.contains("peer_id"), "{e}");

        let p = PeerId::random();
        let text = format!("[[member]]\nname = \"a\"\npeer_id = \"{p}\"\naddrs = [\"tcp/1\"]\n");
        let e = Members::parse(&text).expect_err("bad addr");
        assert!(e.contains("line 4") && e.contains("addrs"), "{e}");

        let e = Members::parse("[[member]]\nname = \"a\"\npeer = 1\n").expect_err("unknown field");
        assert!(e.contains("line 3") && e.contains("peer"), "{e}");

        let p = PeerId::random();
        let q = PeerId::random();
        let text =
            format!("[[member]]\nname = \"a\"\npeer_id = \"{p}\"\n\n[[member]]\nname = \"a\"\npeer_id = \"{q}\"\n");
        let e = Members::parse(&text).expect_err("duplicate name");
        assert!(
            e.contains("line 5") && e.contains("line 1") && e.contains("name"),
            "{e}"
        );
    }
}
