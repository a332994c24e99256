//! ed25519 key files.
//!
//! A private key file holds one line, `sanvol-ed25519-private HEX-SEED`, and
//! is created with mode 0600; its public half sits beside it as `PATH.pub`,
//! one line `sanvol-ed25519 HEX-KEY COMMENT`. Text, so an operator can read,
//! copy and paste public keys (`sanvol client add "$(cat host.pub)" --role agent`).
//! Anywhere a public key is asked for, the file path, the whole line or just
//! the 64 hex digits are accepted.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use ed25519_dalek::{SigningKey, VerifyingKey};

const PRIVATE_TAG: &str = "sanvol-ed25519-private";
const PUBLIC_TAG: &str = "sanvol-ed25519";

/// Generates a key pair at `path` (private, mode 0600) and `path.pub`.
/// Refuses to overwrite either file.
pub fn generate(path: &Path, comment: &str) -> Result<VerifyingKey> {
    let public_path = public_path_for(path);
    for p in [path, public_path.as_path()] {
        if p.exists() {
            bail!(
                "{} already exists; refusing to overwrite a key (remove it first if you really mean to)",
                p.display()
            );
        }
    }
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| anyhow::anyhow!("reading random bytes for a new key: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating private key file {}", path.display()))?;
    writeln!(f, "{PRIVATE_TAG} {}", hex::encode(seed))?;
    f.sync_all()?;
    let public = key.verifying_key();
    let mut p = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&public_path)
        .with_context(|| format!("creating public key file {}", public_path.display()))?;
    writeln!(p, "{}", format_public(&public, comment))?;
    Ok(public)
}

/// `PATH.pub` for a private key at `PATH`.
pub fn public_path_for(path: &Path) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    s.into()
}

/// Loads a private key file written by [`generate`].
pub fn load_private(path: &Path) -> Result<SigningKey> {
    let text = fs::read_to_string(path).with_context(|| format!("reading private key {}", path.display()))?;
    let mut words = text.split_whitespace();
    match (words.next(), words.next()) {
        (Some(PRIVATE_TAG), Some(seed_hex)) => {
            let seed: [u8; 32] = hex::decode(seed_hex)
                .ok()
                .and_then(|v| v.try_into().ok())
                .with_context(|| format!("{}: the key is not 64 hex digits", path.display()))?;
            Ok(SigningKey::from_bytes(&seed))
        }
        _ => bail!("{} is not a sanvol private key (expected a line starting with {PRIVATE_TAG}; create one with `sanvol keygen`)", path.display()),
    }
}

/// One line for a public key file.
pub fn format_public(key: &VerifyingKey, comment: &str) -> String {
    let line = format!("{PUBLIC_TAG} {}", hex::encode(key.as_bytes()));
    if comment.is_empty() {
        line
    } else {
        format!("{line} {comment}")
    }
}

/// Hex form of a public key, as shown in listings.
pub fn public_hex(key: &[u8; 32]) -> String {
    hex::encode(key)
}

/// Parses a public key given as a file path, a `sanvol-ed25519 HEX ...` line
/// or bare hex. Returns the key and its comment (the file's, if any).
pub fn parse_public(spec: &str) -> Result<(VerifyingKey, String)> {
    let spec = spec.trim();
    let text = if Path::new(spec).is_file() {
        fs::read_to_string(spec).with_context(|| format!("reading public key {spec}"))?
    } else {
        spec.to_string()
    };
    let mut words = text.split_whitespace();
    let (hex_part, comment) = match words.next() {
        Some(PUBLIC_TAG) => (words.next().unwrap_or(""), words.collect::<Vec<_>>().join(" ")),
        Some(PRIVATE_TAG) => bail!("{spec} is a private key; give the .pub file"),
        Some(other) => (other, String::new()),
        None => bail!("empty public key"),
    };
    let bytes: [u8; 32] = hex::decode(hex_part)
        .ok()
        .and_then(|v| v.try_into().ok())
        .with_context(|| format!("{spec:?} is not a public key file, a `{PUBLIC_TAG} HEX` line or 64 hex digits"))?;
    let key =
        VerifyingKey::from_bytes(&bytes).with_context(|| format!("{spec:?} is not a valid ed25519 public key"))?;
    Ok((key, comment))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generate_load_parse_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.key");
        let public = generate(&path, "admin@test").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_private(&path).unwrap().verifying_key(), public);
        let pub_path = public_path_for(&path);
        let (parsed, comment) = parse_public(pub_path.to_str().unwrap()).unwrap();
        assert_eq!(parsed, public);
        assert_eq!(comment, "admin@test");
        assert_eq!(parse_public(&hex::encode(public.as_bytes())).unwrap().0, public);
        let err = generate(&path, "again").unwrap_err().to_string();
        assert!(err.contains("refusing to overwrite"), "{err}");
        assert!(parse_public("zz").is_err());
        assert!(load_private(&pub_path).is_err());
    }
}
