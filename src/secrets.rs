//! Server secrets kept outside the database: the access-token signing key and the sealing key that
//! encrypts secrets at rest (environment SSH keys, provider passwords). By default both are
//! generated on first start into the data directory with mode 0600 and reused afterwards, so a
//! restart logs nobody out; nodes of a cluster take them from configuration instead
//! (`auth.secret_key`, `secrets.seal_key`).
//!
//! Keys rotate: a [`KeySet`] holds the current key (used for every new token and sealed value)
//! and previous keys (still accepted for reading). Tokens carry the key id in their `kid` header
//! and sealed values in their `sealed:v2:<kid>:` prefix; a key id is derived from the key (see
//! [`key_id`]), so nodes agree on ids without configuring them. Values sealed before key ids
//! existed (`sealed:v1:`) are opened with whichever key of the set authenticates them.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key as CipherKey, Nonce};
use rand::RngExt;

/// Length of generated keys, in bytes (256 bits).
const KEY_LEN: usize = 32;
/// Length of a ChaCha20-Poly1305 nonce.
const NONCE_LEN: usize = 12;
/// Version tag of sealed values made before key ids (no key named; every key of the set is tried).
const SEALED_V1: &str = "sealed:v1:";
/// Version tag of sealed values that name their key: `sealed:v2:<kid>:<base64(nonce ‖ ciphertext)>`.
const SEALED_V2: &str = "sealed:v2:";
/// Most previous keys a key set accepts for one purpose: each may be tried for a value that names
/// no key (legacy tokens and `sealed:v1:` values), so the cost of a failed open stays bounded.
pub const MAX_PREVIOUS_KEYS: usize = 8;
/// Hex characters of a key's fingerprint that make its key id (64 bits: unique among a handful of
/// keys, and reveals nothing usable about the key).
const KEY_ID_HEX: usize = 16;

pub const JWT_KEY_FILE: &str = "jwt.key";
pub const SEAL_KEY_FILE: &str = "seal.key";

/// Read a key file, or create it with fresh random bytes (mode 0600) if it does not exist.
pub fn load_or_create_key(dir: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(name);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let key = STANDARD
                .decode(text.trim())
                .with_context(|| format!("{} is not base64", path.display()))?;
            if key.len() < KEY_LEN {
                bail!(
                    "{} holds {} bytes; {KEY_LEN} needed",
                    path.display(),
                    key.len()
                );
            }
            let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(file = %path.display(), mode = format!("{mode:o}"), "secret file is readable by others; tightening to 0600");
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let key = random_bytes::<KEY_LEN>().to_vec();
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            file.write_all(STANDARD.encode(&key).as_bytes())?;
            file.sync_all()?;
            tracing::info!(file = %path.display(), "generated a new secret key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill(&mut bytes[..]);
    bytes
}

/// A random URL-safe token with `N` bytes of entropy.
pub fn random_token<const N: usize>() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<N>())
}

/// A key's fingerprint for `purpose` (`"jwt"` or `"seal"`): SHA-256 over a label, the purpose and
/// the key, as 64 hex characters. Stored in the nodes table so nodes can compare key sets without
/// ever storing a key.
pub fn fingerprint(purpose: &str, key: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"devpocket-key-fingerprint/")
        .chain_update(purpose.as_bytes())
        .chain_update(b"/")
        .chain_update(key)
        .finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The id of a key: the first [`KEY_ID_HEX`] characters of its [`fingerprint`].
pub fn key_id(purpose: &str, key: &[u8]) -> String {
    fingerprint(purpose, key)[..KEY_ID_HEX].to_string()
}

/// One key of a [`KeySet`] with its id.
#[derive(Clone)]
pub struct Key {
    pub id: String,
    pub bytes: Vec<u8>,
}

/// The keys of one purpose: the current one (signs and seals) and previous ones (still read).
#[derive(Clone)]
pub struct KeySet {
    purpose: &'static str,
    /// The current key first, then previous keys in the order configured; no duplicates.
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        write!(f, "KeySet({}: {ids:?})", self.purpose)
    }
}

impl KeySet {
    /// A set for `purpose` from the current key and previous keys (each at least 32 bytes; at
    /// most [`MAX_PREVIOUS_KEYS`] previous ones; a previous key equal to the current one, or
    /// given twice, counts once).
    pub fn new(
        purpose: &'static str,
        current: Vec<u8>,
        previous: Vec<Vec<u8>>,
    ) -> anyhow::Result<Self> {
        if previous.len() > MAX_PREVIOUS_KEYS {
            bail!("at most {MAX_PREVIOUS_KEYS} previous {purpose} keys");
        }
        let mut keys: Vec<Key> = Vec::with_capacity(1 + previous.len());
        for bytes in std::iter::once(current).chain(previous) {
            if bytes.len() < KEY_LEN {
                bail!(
                    "a {purpose} key holds {} bytes; {KEY_LEN} needed",
                    bytes.len()
                );
            }
            let id = key_id(purpose, &bytes);
            if !keys.iter().any(|k| k.id == id) {
                keys.push(Key { id, bytes });
            }
        }
        Ok(Self { purpose, keys })
    }

    /// A set of one key (no rotation).
    pub fn single(purpose: &'static str, key: &[u8]) -> anyhow::Result<Self> {
        Self::new(purpose, key.to_vec(), Vec::new())
    }

    pub fn purpose(&self) -> &'static str {
        self.purpose
    }

    /// The key new tokens and sealed values use.
    pub fn current(&self) -> &Key {
        &self.keys[0]
    }

    /// Every key, the current one first.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The fingerprints of every key, the current one first (see [`fingerprint`]).
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| fingerprint(self.purpose, &k.bytes))
            .collect()
    }
}

/// Decode a configured sealing key: standard base64 of at least 32 bytes, the format of a
/// generated `seal.key` file (`openssl rand -base64 32` makes one).
pub fn decode_seal_key(text: &str) -> anyhow::Result<Vec<u8>> {
    let key = STANDARD
        .decode(text.trim())
        .context("not base64 (openssl rand -base64 32 makes one)")?;
    if key.len() < KEY_LEN {
        bail!("decodes to {} bytes; at least {KEY_LEN} needed", key.len());
    }
    Ok(key)
}

/// AEAD sealing of secrets at rest (ChaCha20-Poly1305, random nonce per value). The associated data
/// binds a sealed value to where it belongs (e.g. an environment id), so it cannot be moved. Seals
/// with the current key of its [`KeySet`] (naming it), opens with any key of the set.
#[derive(Clone)]
pub struct Sealer {
    /// `(key id, cipher)`, the current key first.
    ciphers: Vec<(String, ChaCha20Poly1305)>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(***)")
    }
}

impl Sealer {
    /// A sealer with keys of its own for one purpose, each derived from a key of `keys` (SHA-256
    /// over a purpose label and the key): what it seals no other purpose's sealer opens. The
    /// derived keys keep the ids of the keys they come from.
    pub fn for_purpose(keys: &KeySet, purpose: &str) -> anyhow::Result<Self> {
        use sha2::{Digest, Sha256};
        let ciphers = keys
            .keys()
            .iter()
            .map(|k| {
                let derived = Sha256::new()
                    .chain_update(b"devpocket-seal/")
                    .chain_update(purpose.as_bytes())
                    .chain_update(b"/")
                    .chain_update(&k.bytes)
                    .finalize();
                (k.id.clone(), ChaCha20Poly1305::new(&derived))
            })
            .collect();
        Ok(Self { ciphers })
    }

    /// A sealer over every key of `keys`.
    pub fn from_keys(keys: &KeySet) -> Self {
        let ciphers = keys
            .keys()
            .iter()
            .map(|k| {
                (
                    k.id.clone(),
                    ChaCha20Poly1305::new(CipherKey::from_slice(&k.bytes[..KEY_LEN])),
                )
            })
            .collect();
        Self { ciphers }
    }

    /// A sealer with one key (no rotation).
    pub fn new(key: &[u8]) -> anyhow::Result<Self> {
        Ok(Self::from_keys(&KeySet::single("seal", key)?))
    }

    pub fn seal(&self, plaintext: &[u8], aad: &str) -> anyhow::Result<String> {
        let (id, cipher) = &self.ciphers[0];
        let nonce = random_bytes::<NONCE_LEN>();
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| anyhow::anyhow!("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{SEALED_V2}{id}:{}", STANDARD.encode(out)))
    }

    pub fn open(&self, sealed: &str, aad: &str) -> anyhow::Result<Vec<u8>> {
        if let Some(rest) = sealed.strip_prefix(SEALED_V2) {
            let (id, body) = rest.split_once(':').context("sealed value names no key")?;
            let (_, cipher) = self.ciphers.iter().find(|(k, _)| k == id).with_context(|| {
                format!("sealed with key {id}, which this node does not have (add it to the previous seal keys)")
            })?;
            return decrypt(cipher, body, aad);
        }
        let body = sealed
            .strip_prefix(SEALED_V1)
            .context("not a sealed value")?;
        // Made before key ids: whichever key authenticates it sealed it.
        self.ciphers
            .iter()
            .find_map(|(_, cipher)| decrypt(cipher, body, aad).ok())
            .context("sealed value failed authentication")
    }
}

fn decrypt(cipher: &ChaCha20Poly1305, body: &str, aad: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = STANDARD
        .decode(body)
        .context("sealed value is not base64")?;
    if bytes.len() < NONCE_LEN {
        bail!("sealed value too short");
    }
    let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| anyhow::anyhow!("sealed value failed authentication"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create_key(dir.path(), JWT_KEY_FILE).expect("create");
        let mode = fs::metadata(dir.path().join(JWT_KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create_key(dir.path(), JWT_KEY_FILE).expect("reuse");
        assert_eq!(a, b);
        let c = load_or_create_key(dir.path(), SEAL_KEY_FILE).expect("other");
        assert_ne!(a, c);
    }

    #[test]
    fn seal_round_trip_and_tamper_detection() {
        let sealer = Sealer::new(&random_bytes::<32>()).expect("sealer");
        let sealed = sealer.seal(b"private key", "env-1").expect("seal");
        assert!(!sealed.contains("private key"));
        assert_eq!(sealer.open(&sealed, "env-1").expect("open"), b"private key");
        assert!(
            sealer.open(&sealed, "env-2").is_err(),
            "wrong aad must fail"
        );
        let other = Sealer::new(&random_bytes::<32>()).expect("sealer");
        assert!(other.open(&sealed, "env-1").is_err(), "wrong key must fail");
        assert_ne!(
            sealer.seal(b"x", "a").expect("seal"),
            sealer.seal(b"x", "a").expect("seal")
        );
    }

    /// A v1 value as the previous release sealed it (no key id), for the tests below.
    fn seal_v1(key: &[u8], plaintext: &[u8], aad: &str) -> String {
        let cipher = ChaCha20Poly1305::new(CipherKey::from_slice(&key[..KEY_LEN]));
        let nonce = random_bytes::<NONCE_LEN>();
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .expect("seal");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        format!("{SEALED_V1}{}", STANDARD.encode(out))
    }

    #[test]
    fn rotation_keeps_old_values_readable_and_seals_with_the_new_key() {
        let old = random_bytes::<32>().to_vec();
        let new = random_bytes::<32>().to_vec();
        let before = Sealer::from_keys(&KeySet::single("seal", &old).expect("keys"));
        let sealed_before = before.seal(b"ssh key", "env-1").expect("seal");
        let legacy = seal_v1(&old, b"legacy", "env-2");
        assert!(sealed_before.starts_with(&format!("sealed:v2:{}:", key_id("seal", &old))));

        let keys = KeySet::new("seal", new.clone(), vec![old.clone()]).expect("keys");
        assert_eq!(keys.current().id, key_id("seal", &new));
        let after = Sealer::from_keys(&keys);
        assert_eq!(
            after.open(&sealed_before, "env-1").expect("old value"),
            b"ssh key"
        );
        assert_eq!(after.open(&legacy, "env-2").expect("v1 value"), b"legacy");
        let sealed_after = after.seal(b"new", "env-3").expect("seal");
        assert!(sealed_after.starts_with(&format!("sealed:v2:{}:", key_id("seal", &new))));

        // Without the old key: the old value names a key this node lacks.
        let only_new = Sealer::from_keys(&KeySet::single("seal", &new).expect("keys"));
        let err = only_new
            .open(&sealed_before, "env-1")
            .expect_err("missing key");
        assert!(err.to_string().contains(&key_id("seal", &old)), "{err}");
        assert!(only_new.open(&legacy, "env-2").is_err());

        // Derived purposes rotate alike and stay apart.
        let sessions_before =
            Sealer::for_purpose(&KeySet::single("seal", &old).expect("k"), "sessions").expect("s");
        let sessions_after = Sealer::for_purpose(&keys, "sessions").expect("s");
        let v = sessions_before.seal(b"pair", "s1").expect("seal");
        assert_eq!(sessions_after.open(&v, "s1").expect("open"), b"pair");
        assert!(after.open(&v, "s1").is_err(), "purposes are apart");
    }

    #[test]
    fn key_sets_are_bounded_and_fingerprints_hide_the_key() {
        let key = random_bytes::<32>().to_vec();
        let set = KeySet::new("jwt", key.clone(), vec![key.clone()]).expect("keys");
        assert_eq!(set.keys().len(), 1, "duplicates count once");
        let fp = &set.fingerprints()[0];
        assert_eq!(fp.len(), 64);
        assert!(!fp.contains(&STANDARD.encode(&key)));
        assert_ne!(fingerprint("jwt", &key), fingerprint("seal", &key));
        assert!(KeySet::new("jwt", vec![1; 8], vec![]).is_err(), "too short");
        let many = (0..=MAX_PREVIOUS_KEYS)
            .map(|_| random_bytes::<32>().to_vec())
            .collect();
        assert!(KeySet::new("jwt", key, many).is_err(), "too many");
        assert!(decode_seal_key("not base64!").is_err());
        assert!(decode_seal_key(&STANDARD.encode([0u8; 16])).is_err());
        assert_eq!(
            decode_seal_key(&STANDARD.encode([3u8; 32])).expect("ok"),
            vec![3u8; 32]
        );
    }
}
