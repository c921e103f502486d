//! Node and organisation identities: ed25519 keys.
//!
//! A node's public key is its [`NodeId`]. The same 32 bytes are the Automerge actor id of
//! every change the node makes, so a change names its author verifiably, and they are
//! printed in the libp2p PeerId text form (`12D3KooW…`) so that one id is shown everywhere.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

/// Length of an ed25519 public key, and so of a [`NodeId`] and an [`OrgId`].
pub const KEY_LEN: usize = 32;

/// The multihash/protobuf prefix libp2p puts before an ed25519 key in a PeerId:
/// identity multihash (0x00), length 36, protobuf field 1 = Ed25519 (0x08 0x01),
/// field 2 = 32 bytes (0x12 0x20).
const PEER_ID_PREFIX: [u8; 6] = [0x00, 0x24, 0x08, 0x01, 0x12, 0x20];

/// The public identity of a node: its ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId([u8; KEY_LEN]);

/// The public identity of an organisation: the org key that signs policies.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct OrgId([u8; KEY_LEN]);

/// A node's secret key, with its public [`NodeId`].
#[derive(Clone)]
pub struct Identity {
    signing_key: SigningKey,
    node_id: NodeId,
}

/// Why a text or byte string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The text is not base58.
    #[error("`{0}` is not a node id: it is not base58 text")]
    NotBase58(String),
    /// The decoded bytes do not have the shape of an ed25519 PeerId.
    #[error("`{0}` is not a node id: node ids look like 12D3KooW… (an ed25519 libp2p PeerId)")]
    NotEd25519(String),
    /// The bytes are not a valid ed25519 public key.
    #[error("the bytes are not a valid ed25519 public key")]
    InvalidKey,
}

impl NodeId {
    /// The node id for these public key bytes, if they are a valid ed25519 point.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Result<NodeId, IdError> {
        VerifyingKey::from_bytes(&bytes).map_err(|_| IdError::InvalidKey)?;
        Ok(NodeId(bytes))
    }

    /// The node id for a slice, such as an Automerge actor id.
    pub fn from_slice(bytes: &[u8]) -> Result<NodeId, IdError> {
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|_| IdError::InvalidKey)?;
        NodeId::from_bytes(bytes)
    }

    /// The node id of a key already decompressed (so already known valid).
    pub(crate) fn from_verifying_key(key: &VerifyingKey) -> NodeId {
        NodeId(key.to_bytes())
    }

    /// The raw public key.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The verifying key. Infallible because construction checked the point.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::from_bytes(&self.0).expect("NodeId is only built from valid keys")
    }

    /// The Automerge actor id of every change this node makes.
    pub fn actor_id(&self) -> automerge::ActorId {
        automerge::ActorId::from(&self.0[..])
    }

    /// The first characters after the common `12D3KooW` prefix, for compact display.
    pub fn short(&self) -> String {
        let full = self.to_string();
        full.chars().skip(8).take(6).collect()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bytes = Vec::with_capacity(PEER_ID_PREFIX.len() + KEY_LEN);
        bytes.extend_from_slice(&PEER_ID_PREFIX);
        bytes.extend_from_slice(&self.0);
        f.write_str(&bs58::encode(bytes).into_string())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = IdError;

    fn from_str(text: &str) -> Result<NodeId, IdError> {
        let bytes = bs58::decode(text)
            .into_vec()
            .map_err(|_| IdError::NotBase58(text.to_owned()))?;
        let key = bytes
            .strip_prefix(&PEER_ID_PREFIX[..])
            .ok_or_else(|| IdError::NotEd25519(text.to_owned()))?;
        NodeId::from_slice(key).map_err(|_| IdError::NotEd25519(text.to_owned()))
    }
}

impl serde::Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl OrgId {
    /// The org id for these public key bytes.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> OrgId {
        OrgId(bytes)
    }

    /// The raw bytes, as they enter every change signature.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.0).into_string())
    }
}

impl fmt::Debug for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OrgId({self})")
    }
}

impl FromStr for OrgId {
    type Err = IdError;

    fn from_str(text: &str) -> Result<OrgId, IdError> {
        let bytes = bs58::decode(text)
            .into_vec()
            .map_err(|_| IdError::NotBase58(text.to_owned()))?;
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|_| IdError::InvalidKey)?;
        Ok(OrgId(bytes))
    }
}

impl Identity {
    /// The identity for a 32-byte ed25519 secret key. The daemon draws the key from the OS;
    /// the core never does.
    pub fn from_secret_bytes(secret: [u8; KEY_LEN]) -> Identity {
        let signing_key = SigningKey::from_bytes(&secret);
        let node_id = NodeId(signing_key.verifying_key().to_bytes());
        Identity {
            signing_key,
            node_id,
        }
    }

    /// A deterministic identity for tests and the simulator: the key is a hash of `seed`.
    pub fn from_seed(seed: u64) -> Identity {
        let secret: [u8; KEY_LEN] = Sha256::new()
            .chain_update(b"mesh/test-identity/v1")
            .chain_update(seed.to_le_bytes())
            .finalize()
            .into();
        Identity::from_secret_bytes(secret)
    }

    /// The secret key bytes, for the daemon to store in its key file.
    pub fn secret_bytes(&self) -> [u8; KEY_LEN] {
        self.signing_key.to_bytes()
    }

    /// This node's public id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Signs `message` with the node key.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing_key.sign(message).to_bytes()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret key.
        write!(f, "Identity({:?})", self.node_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_text_round_trips_and_looks_like_a_peer_id() {
        let id = Identity::from_seed(7).node_id();
        let text = id.to_string();
        assert!(text.starts_with("12D3KooW"), "{text}");
        assert_eq!(text.parse::<NodeId>().unwrap(), id);
    }

    #[test]
    fn garbage_node_ids_are_refused_with_a_reason() {
        assert!(matches!(
            "0OIl".parse::<NodeId>(),
            Err(IdError::NotBase58(_))
        ));
        assert!(matches!(
            "abc".parse::<NodeId>(),
            Err(IdError::NotEd25519(_))
        ));
    }

    #[test]
    fn identities_from_the_same_seed_are_equal_and_differ_across_seeds() {
        assert_eq!(
            Identity::from_seed(1).node_id(),
            Identity::from_seed(1).node_id()
        );
        assert_ne!(
            Identity::from_seed(1).node_id(),
            Identity::from_seed(2).node_id()
        );
    }
}
