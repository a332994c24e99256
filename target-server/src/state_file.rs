//! The raised minimum generations, on disk: a target that restarts must
//! keep refusing what it refused before, or a fenced holder could simply
//! reconnect with its old capability.
//!
//! Why text: a few lines an operator can read (`server 3 1764633600`,
//! `h12 2 1764633600`: holder, minimum generation, when it was raised),
//! replaced atomically (write a temporary file, fsync, rename, fsync the
//! directory) before a raise is acknowledged.

use std::io::Write;
use std::path::{Path, PathBuf};

use volume_format::capability::Holder;
use volume_format::HandleId;

use crate::fence::{Fence, FENCES_MAX};

const HEADER: &str = "# sanvol-target fences v1: holder min_generation raised_unix_secs";
const FILE_NAME: &str = "fences";

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot {what} {path}: {source}; check the --state-dir")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} line {line}: {problem}; the file is written only by sanvol-target — restore it from a backup or, if every capability it refused has expired, remove it")]
    Corrupt { path: PathBuf, line: usize, problem: String },
}

/// Where a target keeps its fences.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    pub fn new(dir: impl Into<PathBuf>) -> StateFile {
        StateFile { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The fences saved last; none if the file does not exist yet.
    pub fn load(&self) -> Result<Vec<(Holder, Fence)>, StateFileError> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StateFileError::Io { what: "read", path, source }),
        };
        parse(&text).map_err(|(line, problem)| StateFileError::Corrupt { path, line, problem })
    }

    /// Replaces the file with `fences`, durably.
    pub fn save(&self, fences: &[(Holder, Fence)]) -> Result<(), StateFileError> {
        fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateFileError {
            let path = path.to_path_buf();
            move |source| StateFileError::Io { what, path, source }
        }
        std::fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let mut file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        file.write_all(render(fences).as_bytes()).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("fsync", &tmp))?;
        let path = self.path();
        std::fs::rename(&tmp, &path).map_err(io("rename into place", &path))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io("fsync", &self.dir))
    }
}

fn render(fences: &[(Holder, Fence)]) -> String {
    let mut text = format!("{HEADER}\n");
    for (holder, fence) in fences {
        let name = match holder {
            Holder::Server => "server".to_string(),
            Holder::Handle(h) => format!("h{}", h.0),
        };
        text.push_str(&format!("{name} {} {}\n", fence.min_generation, fence.raised_unix_secs));
    }
    text
}

fn parse(text: &str) -> Result<Vec<(Holder, Fence)>, (usize, String)> {
    let mut fences = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if fences.len() >= FENCES_MAX {
            return Err((line_no, format!("more than {FENCES_MAX} entries")));
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [holder, min, raised] = fields[..] else {
            return Err((line_no, "expected three fields: holder min_generation raised_unix_secs".into()));
        };
        let holder = match holder {
            "server" => Holder::Server,
            h => match h.strip_prefix('h').and_then(|n| n.parse().ok()) {
                Some(n) => Holder::Handle(HandleId(n)),
                None => return Err((line_no, format!("unknown holder {h:?} (server or hN)"))),
            },
        };
        let number = |s: &str| s.parse::<u64>().map_err(|e| (line_no, format!("{s:?}: {e}")));
        fences.push((holder, Fence { min_generation: number(min)?, raised_unix_secs: number(raised)? }));
    }
    Ok(fences)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_survive_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("state"));
        assert!(file.load().unwrap().is_empty());
        let fences = vec![
            (Holder::Server, Fence { min_generation: 2, raised_unix_secs: 10 }),
            (Holder::Handle(HandleId(12)), Fence { min_generation: u64::MAX, raised_unix_secs: 11 }),
        ];
        file.save(&fences).unwrap();
        assert_eq!(file.load().unwrap(), fences);
    }

    #[test]
    fn a_damaged_file_is_a_clear_error() {
        for text in ["h 1 2", "h1 1", "x1 1 2", "h1 one 2"] {
            let (line, problem) = parse(text).unwrap_err();
            assert_eq!(line, 1, "{problem}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "bogus\n").unwrap();
        let err = StateFile::new(dir.path()).load().unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
