//! Server secrets kept outside the database: the access-token signing key and the sealing key that
//! encrypts secrets at rest (environment SSH keys, provider passwords). Both are generated on first
//! start into the data directory with mode 0600 and reused afterwards, so a restart logs nobody out.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngExt;

/// Length of generated keys, in bytes (256 bits).
const KEY_LEN: usize = 32;
/// Length of a ChaCha20-Poly1305 nonce.
const NONCE_LEN: usize = 12;
/// Version tag of sealed values, so the format can change later.
const SEALED_PREFIX: &str = "sealed:v1:";

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

/// AEAD sealing of secrets at rest (ChaCha20-Poly1305, random nonce per value). The associated data
/// binds a sealed value to where it belongs (e.g. an environment id), so it cannot be moved.
#[derive(Clone)]
pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(***)")
    }
}

impl Sealer {
    /// A sealer with a key of its own for one purpose, derived from `key` (SHA-256 over a
    /// purpose label and the key): what it seals no other purpose's sealer opens.
    pub fn for_purpose(key: &[u8], purpose: &str) -> anyhow::Result<Self> {
        use sha2::{Digest, Sha256};
        if key.len() < KEY_LEN {
            bail!("sealing key too short");
        }
        let derived = Sha256::new()
            .chain_update(b"devpocket-seal/")
            .chain_update(purpose.as_bytes())
            .chain_update(b"/")
            .chain_update(key)
            .finalize();
        Self::new(&derived)
    }

    pub fn new(key: &[u8]) -> anyhow::Result<Self> {
        if key.len() < KEY_LEN {
            bail!("sealing key too short");
        }
        Ok(Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key[..KEY_LEN])),
        })
    }

    pub fn seal(&self, plaintext: &[u8], aad: &str) -> anyhow::Result<String> {
        let nonce = random_bytes::<NONCE_LEN>();
        let sealed = self
            .cipher
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
        Ok(format!("{SEALED_PREFIX}{}", STANDARD.encode(out)))
    }

    pub fn open(&self, sealed: &str, aad: &str) -> anyhow::Result<Vec<u8>> {
        let body = sealed
            .strip_prefix(SEALED_PREFIX)
            .context("not a sealed value")?;
        let bytes = STANDARD
            .decode(body)
            .context("sealed value is not base64")?;
        if bytes.len() < NONCE_LEN {
            bail!("sealed value too short");
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| anyhow::anyhow!("sealed value failed authentication"))
    }
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
}
