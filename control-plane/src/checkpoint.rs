//! Signed audit checkpoints: the chain's head (sequence number and hash) signed with an Ed25519
//! key kept outside the database. The server writes one to its log (and to a file, if asked)
//! whenever the trail has grown; keep copies elsewhere (a log collector, a SIEM). Someone who
//! can rewrite the database and recompute every hash still cannot produce a checkpoint, so
//! `airlockctl audit verify --checkpoint FILE --public-key HEX` finds the rewrite: the record at
//! the checkpoint's sequence number no longer has the signed hash, or is gone.
//!
//! A checkpoint is one line:
//! `airlock-checkpoint v1 seq=N hash=HEX at=UNIX_MS key=PUBLIC_HEX sig=SIGNATURE_HEX`, signed
//! over `airlock-checkpoint v1\x1f{seq}\x1f{hash}\x1f{at}`.

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

/// The line's first word, and its version.
const MAGIC: &str = "airlock-checkpoint v1";

/// Why a checkpoint (or its key) was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    /// The key file does not hold a 32-byte seed in hex.
    #[error("the checkpoint key must be 64 hex digits (an Ed25519 seed, e.g. from `openssl rand -hex 32`)")]
    BadKey,
    /// The line is not a checkpoint.
    #[error("not a checkpoint line: {0}")]
    Malformed(String),
    /// The checkpoint was signed by another key than the one given.
    #[error("the checkpoint was signed by key {0}, not the one given")]
    OtherKey(String),
    /// The signature does not match.
    #[error("the checkpoint's signature does not verify")]
    BadSignature,
}

/// A chain head, signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Sequence number of the last record covered.
    pub seq: i64,
    /// That record's hash.
    pub hash: String,
    /// When it was signed, Unix ms.
    pub at_ms: i64,
    /// The signer's public key, hex.
    pub key: String,
    /// The signature, hex.
    pub sig: String,
}

fn signed_text(seq: i64, hash: &str, at_ms: i64) -> String {
    format!("{MAGIC}\u{1f}{seq}\u{1f}{hash}\u{1f}{at_ms}")
}

/// The server's checkpoint key.
pub struct Signer {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.public_hex())
    }
}

impl Signer {
    /// The key whose 32-byte seed is `hex_seed` (white space around it ignored).
    pub fn from_hex(hex_seed: &str) -> Result<Self, CheckpointError> {
        let seed = hex::decode(hex_seed.trim()).map_err(|_| CheckpointError::BadKey)?;
        let pair =
            Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| CheckpointError::BadKey)?;
        Ok(Self { pair })
    }

    /// The public key, hex: give it to `airlockctl audit verify --public-key`.
    pub fn public_hex(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    /// The checkpoint of record `seq` with hash `hash`, signed at `at_ms`.
    pub fn sign(&self, seq: i64, hash: &str, at_ms: i64) -> Checkpoint {
        let sig = self.pair.sign(signed_text(seq, hash, at_ms).as_bytes());
        Checkpoint {
            seq,
            hash: hash.to_owned(),
            at_ms,
            key: self.public_hex(),
            sig: hex::encode(sig.as_ref()),
        }
    }
}

impl std::fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{MAGIC} seq={} hash={} at={} key={} sig={}",
            self.seq, self.hash, self.at_ms, self.key, self.sig
        )
    }
}

impl Checkpoint {
    /// The last checkpoint line in `text` (a log excerpt or a file of them; other lines and
    /// anything before the magic words on a line are skipped).
    pub fn last_in(text: &str) -> Result<Self, CheckpointError> {
        let line = text
            .lines()
            .rev()
            .find_map(|l| l.find(MAGIC).map(|i| &l[i..]))
            .ok_or_else(|| CheckpointError::Malformed("no checkpoint line found".into()))?;
        Self::parse(line)
    }

    /// One checkpoint line.
    pub fn parse(line: &str) -> Result<Self, CheckpointError> {
        let bad = || CheckpointError::Malformed(line.chars().take(120).collect());
        let rest = line.trim().strip_prefix(MAGIC).ok_or_else(bad)?;
        let field = |name: &str| -> Result<String, CheckpointError> {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
                .ok_or_else(bad)
        };
        Ok(Self {
            seq: field("seq")?.parse().map_err(|_| bad())?,
            hash: field("hash")?,
            at_ms: field("at")?.parse().map_err(|_| bad())?,
            key: field("key")?,
            sig: field("sig")?,
        })
    }

    /// Checks the signature with `public_hex`, the key the server printed.
    pub fn verify(&self, public_hex: &str) -> Result<(), CheckpointError> {
        if !public_hex.trim().eq_ignore_ascii_case(&self.key) {
            return Err(CheckpointError::OtherKey(self.key.clone()));
        }
        let key = hex::decode(public_hex.trim()).map_err(|_| CheckpointError::BadKey)?;
        let sig = hex::decode(&self.sig).map_err(|_| CheckpointError::BadSignature)?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(
                signed_text(self.seq, &self.hash, self.at_ms).as_bytes(),
                &sig,
            )
            .map_err(|_| CheckpointError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";

    #[test]
    fn signs_parses_and_verifies() {
        let s = Signer::from_hex(SEED).unwrap();
        let c = s.sign(42, "ab12", 1_700_000_000_000);
        let line = format!("2026-11-29T18:00:00Z INFO audit checkpoint {c}");
        let back = Checkpoint::last_in(&format!("noise\n{line}\nmore noise\n")).unwrap();
        assert_eq!(back, c);
        back.verify(&s.public_hex()).unwrap();
        let mut forged = back.clone();
        forged.hash = "cd34".into();
        assert_eq!(
            forged.verify(&s.public_hex()),
            Err(CheckpointError::BadSignature)
        );
        let other = Signer::from_hex(&"11".repeat(32)).unwrap();
        assert!(matches!(
            c.verify(&other.public_hex()),
            Err(CheckpointError::OtherKey(_))
        ));
        assert_eq!(
            Signer::from_hex("short").unwrap_err(),
            CheckpointError::BadKey
        );
    }
}
