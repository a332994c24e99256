//! The agent's config file (`--config`, default [`DEFAULT_CONFIG`]): every
//! `sanvol-agent run` option, and the volumes to attach at every start
//! (persistent attachments, like Ceph's `rbdmap`).
//!
//! ```toml
//! mds = ["10.0.0.1:7700", "10.0.0.2:7700"]   # any `run` option, '-' written '_'
//! key = "/etc/sanvol/host.key"
//! server_key = "/etc/sanvol/mds.key.pub"
//! metrics_addr = "127.0.0.1:9750"
//!
//! [[volume]]                 # `sanvol-agent attach --persist` adds these
//! name = "db"
//! mode = "exclusive"         # exclusive | shared | ro
//! socket = "/run/sanvol/db.sock"   # or tcp = "127.0.0.1:10809", or nbd_device = "/dev/nbd0"
//! ```
//!
//! Why the options are not a struct of their own: they are checked by the
//! value parsers of the clap `run` command itself ([`Setting::check`]), so
//! every flag can be set here, with the same validation, without a second
//! list that could drift from the first.
//!
//! Why `toml_edit`: `attach --persist` and `detach --persist` rewrite the
//! file the operator wrote; it keeps their comments, order and layout and
//! touches only the `[[volume]]` table it changes. The rewrite is atomic
//! (a temporary file, fsync, rename, fsync of the directory) and keeps the
//! file's permissions; a new file gets mode 0644 (it names key files but
//! holds no secret).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use toml_edit::{ImDocument, Item, Table};
use volume_format::control::messages::OpenMode;

/// Where `sanvol-agent run` reads its config unless told otherwise (a missing
/// file at this path is no error).
pub const DEFAULT_CONFIG: &str = "/etc/sanvol/agent.toml";
/// Largest config file read.
pub const CONFIG_BYTES_MAX: u64 = 1 << 20;
/// Most `[[volume]]` entries one file may hold.
pub const VOLUMES_MAX: usize = 4096;
/// The table array of persisted volumes.
const VOLUME_TABLE: &str = "volume";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {what}: {error}", path.display())]
    Io { path: PathBuf, what: &'static str, error: std::io::Error },
    #[error("{} line {line}: {message}", path.display())]
    At { path: PathBuf, line: usize, message: String },
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
}

/// One `run` option set in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The key as written (`server_key`).
    pub key: String,
    /// Its values as the command line would give them (several for arrays;
    /// `true` for a flag).
    pub values: Vec<String>,
    pub line: usize,
}

/// How a persisted volume is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PersistedTarget {
    /// On a unix socket (`None`: the default `EXPORT_DIR/VOLUME.sock`).
    Socket(Option<PathBuf>),
    /// On loopback TCP.
    Tcp(SocketAddr),
    /// On a kernel NBD device (`None`: the one a clean stop left connected
    /// to the volume, else the first free one).
    Kernel(Option<u32>),
}

/// A `[[volume]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistedVolume {
    pub name: String,
    pub mode: OpenMode,
    pub target: PersistedTarget,
    /// Where it is in the file (0 for an entry not read from a file).
    pub line: usize,
}

/// A parsed config file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentConfigFile {
    pub settings: Vec<Setting>,
    pub volumes: Vec<PersistedVolume>,
}

/// The mode's name in the file (the CLI's `--mode` values).
pub fn mode_name(mode: OpenMode) -> &'static str {
    match mode {
        OpenMode::Exclusive => "exclusive",
        OpenMode::SharedWrite => "shared",
        OpenMode::ReadOnly => "ro",
    }
}

fn parse_mode(s: &str) -> Option<OpenMode> {
    match s {
        "exclusive" => Some(OpenMode::Exclusive),
        "shared" => Some(OpenMode::SharedWrite),
        "ro" | "read-only" => Some(OpenMode::ReadOnly),
        _ => None,
    }
}

fn line_of(text: &str, at: Option<std::ops::Range<usize>>) -> usize {
    let at = at.map(|r| r.start).unwrap_or(0).min(text.len());
    text.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Reads the file at `path`. `Ok(None)` if it does not exist and `required`
/// is false (the default path); every other failure names the file and,
/// when it is about a key, the line and the key.
pub fn load(path: &Path, required: bool) -> Result<Option<AgentConfigFile>, ConfigError> {
    let text = match read_text(path) {
        Ok(text) => text,
        Err(ConfigError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    parse(path, &text).map(Some)
}

fn read_text(path: &Path) -> Result<String, ConfigError> {
    let io = |what| move |error| ConfigError::Io { path: path.to_path_buf(), what, error };
    let file = File::open(path).map_err(io("cannot read the config file (see --config)"))?;
    let len = file.metadata().map_err(io("cannot read the config file"))?.len();
    if len > CONFIG_BYTES_MAX {
        return Err(ConfigError::File {
            path: path.to_path_buf(),
            message: format!("{len} bytes, more than the {CONFIG_BYTES_MAX} a config file may have"),
        });
    }
    std::fs::read_to_string(path).map_err(io("cannot read the config file"))
}

/// Parses config text (`path` is for messages).
pub fn parse(path: &Path, text: &str) -> Result<AgentConfigFile, ConfigError> {
    let at_span = |span: Option<std::ops::Range<usize>>, message: String| ConfigError::At {
        path: path.to_path_buf(),
        line: line_of(text, span),
        message,
    };
    let doc = ImDocument::parse(text).map_err(|e| at_span(e.span(), e.message().trim().to_string()))?;
    let at = &at_span;
    let mut config = AgentConfigFile::default();
    for (key, item) in doc.as_table().iter() {
        let span = doc.as_table().key(key).and_then(|k| k.span()).or_else(|| item.span());
        let at = |message: String| at(span.clone(), message);
        if key == VOLUME_TABLE {
            let Some(tables) = item.as_array_of_tables() else {
                return Err(at(format!("key `{key}`: write the volumes as [[{VOLUME_TABLE}]] tables")));
            };
            for table in tables.iter() {
                config.volumes.push(parse_volume(table, &at_span, text)?);
            }
            continue;
        }
        let values = match item {
            Item::Value(v) => match v {
                toml_edit::Value::Array(a) => {
                    a.iter().map(|v| scalar(v).ok_or(())).collect::<Result<Vec<_>, ()>>().map_err(|()| {
                        at(format!("key `{key}`: an array may hold only strings, numbers and booleans"))
                    })?
                }
                v => vec![scalar(v).ok_or_else(|| at(format!("key `{key}`: expected a string, number or boolean")))?],
            },
            _ => return Err(at(format!("key `{key}`: expected a value, not a table"))),
        };
        config.settings.push(Setting { key: key.to_string(), values, line: line_of(text, span) });
    }
    if config.volumes.len() > VOLUMES_MAX {
        return Err(ConfigError::File {
            path: path.to_path_buf(),
            message: format!("{} volumes, more than the {VOLUMES_MAX} one agent attaches", config.volumes.len()),
        });
    }
    let mut names = std::collections::HashSet::new();
    for v in &config.volumes {
        if !names.insert(v.name.as_str()) {
            return Err(ConfigError::At {
                path: path.to_path_buf(),
                line: v.line,
                message: format!("volume {:?} is listed twice; keep one [[volume]] entry per volume", v.name),
            });
        }
    }
    Ok(config)
}

fn scalar(v: &toml_edit::Value) -> Option<String> {
    match v {
        toml_edit::Value::String(s) => Some(s.value().clone()),
        toml_edit::Value::Integer(i) => Some(i.value().to_string()),
        toml_edit::Value::Boolean(b) => Some(b.value().to_string()),
        _ => None,
    }
}

fn parse_volume(
    table: &Table,
    at: &dyn Fn(Option<std::ops::Range<usize>>, String) -> ConfigError,
    text: &str,
) -> Result<PersistedVolume, ConfigError> {
    let table_span = table.span();
    let mut name = None;
    let mut mode = OpenMode::Exclusive;
    let (mut socket, mut tcp, mut kernel, mut device) = (None, None, None, None);
    for (key, item) in table.iter() {
        let span = table.key(key).and_then(|k| k.span()).or_else(|| item.span()).or(table_span.clone());
        let string = || {
            item.as_str().map(str::to_string).ok_or_else(|| at(span.clone(), format!("key `{key}`: expected a string")))
        };
        match key {
            "name" => name = Some(string()?),
            "mode" => {
                let s = string()?;
                mode = parse_mode(&s).ok_or_else(|| {
                    at(span.clone(), format!("key `mode`: {s:?} is not a mode (exclusive, shared or ro)"))
                })?;
            }
            "socket" => socket = Some(PathBuf::from(string()?)),
            "tcp" => {
                let s = string()?;
                tcp = Some(s.parse::<SocketAddr>().map_err(|e| {
                    at(span.clone(), format!("key `tcp`: {s:?} is not an address like 127.0.0.1:10809: {e}"))
                })?);
            }
            "kernel" => {
                kernel = Some(
                    item.as_bool().ok_or_else(|| at(span.clone(), "key `kernel`: expected true or false".into()))?,
                )
            }
            "nbd_device" => {
                let s = string()?;
                device = Some(
                    crate::kernel::parse_device(&s).map_err(|e| at(span.clone(), format!("key `nbd_device`: {e}")))?,
                );
            }
            other => {
                return Err(at(
                    span,
                    format!(
                        "unknown key `{other}` in a [[{VOLUME_TABLE}]] entry (known: name, mode, socket, tcp, kernel, \
                         nbd_device)"
                    ),
                ))
            }
        }
    }
    let name = name.ok_or_else(|| at(table_span.clone(), format!("a [[{VOLUME_TABLE}]] entry lacks key `name`")))?;
    let line = line_of(text, table_span.clone());
    let kernel = kernel.unwrap_or(device.is_some());
    let target = match (socket, tcp, kernel) {
        (Some(_), Some(_), _) => {
            return Err(at(table_span, format!("volume {name:?}: give `socket` or `tcp`, not both")));
        }
        (Some(_), _, true) | (_, Some(_), true) => {
            return Err(at(
                table_span,
                format!(
                    "volume {name:?}: a kernel device (`nbd_device`, `kernel`) is served without `socket` or `tcp`"
                ),
            ));
        }
        (_, _, false) if device.is_some() => {
            return Err(at(table_span, format!("volume {name:?}: `nbd_device` needs `kernel = true`")));
        }
        (socket, None, false) => PersistedTarget::Socket(socket),
        (None, Some(tcp), false) => PersistedTarget::Tcp(tcp),
        (None, None, true) => PersistedTarget::Kernel(device),
    };
    Ok(PersistedVolume { name, mode, target, line })
}

impl Setting {
    /// Checks the values with the value parser of the `run` option whose
    /// id is the key (`server_key` → `--server-key`); the error names the
    /// file, the line and the key.
    pub fn check(&self, path: &Path, run: &clap::Command) -> Result<(), ConfigError> {
        let at = |message: String| ConfigError::At { path: path.to_path_buf(), line: self.line, message };
        let Some(arg) = run.get_arguments().find(|a| a.get_id().as_str() == self.key && a.get_long().is_some()) else {
            let mut known: Vec<&str> = run
                .get_arguments()
                .filter(|a| {
                    a.get_long().is_some() && !a.is_hide_set() && a.get_id() != "config" && a.get_id() != "help"
                })
                .map(|a| a.get_id().as_str())
                .collect();
            known.sort();
            return Err(at(format!(
                "unknown key `{}` (the keys are `sanvol-agent run`'s options with '_' for '-': {}; and [[volume]] \
                 tables)",
                self.key,
                known.join(", ")
            )));
        };
        if arg.get_id() == "config" {
            return Err(at("key `config`: a config file cannot name another one".into()));
        }
        let takes_many = matches!(arg.get_action(), clap::ArgAction::Append)
            || arg.get_num_args().is_some_and(|n| n.max_values() > 1);
        if self.values.len() != 1 && !takes_many {
            return Err(at(format!("key `{}`: expected one value, not an array", self.key)));
        }
        let args = self.command_line(arg);
        run.clone()
            .no_binary_name(true)
            .try_get_matches_from(&args)
            .map_err(|e| at(format!("key `{}`: {}", self.key, first_line(&e.to_string()))))?;
        Ok(())
    }

    /// The option as it would be written on the command line of `run`
    /// (`--server-key VALUE`; a flag set to `false` is no words at all).
    pub fn command_line(&self, arg: &clap::Arg) -> Vec<String> {
        let long = format!("--{}", arg.get_long().unwrap_or(arg.get_id().as_str()));
        if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
            return if self.values.iter().all(|v| v == "true") { vec![long] } else { Vec::new() };
        }
        self.values.iter().flat_map(|v| [long.clone(), v.clone()]).collect()
    }
}

fn first_line(clap_error: &str) -> String {
    clap_error.trim().trim_start_matches("error: ").lines().next().unwrap_or_default().to_string()
}

/// Adds `volume` to the file at `path` (creating it), or replaces the entry
/// of the same name in place; everything else in the file stays as written.
pub fn add_volume(path: &Path, volume: &PersistedVolume) -> Result<(), ConfigError> {
    edit(path, |doc| {
        let tables = volume_tables(doc, path)?;
        let found = tables.iter().position(|t| t.get("name").and_then(Item::as_str) == Some(&volume.name));
        let index = match found {
            Some(i) => i,
            None => {
                tables.push(Table::new());
                tables.len() - 1
            }
        };
        let table = tables.get_mut(index).expect("an entry at this index");
        for key in ["socket", "tcp", "kernel", "nbd_device"] {
            table.remove(key);
        }
        table["name"] = toml_edit::value(volume.name.clone());
        table["mode"] = toml_edit::value(mode_name(volume.mode));
        match &volume.target {
            PersistedTarget::Socket(None) => {}
            PersistedTarget::Socket(Some(socket)) => table["socket"] = toml_edit::value(socket.display().to_string()),
            PersistedTarget::Tcp(addr) => table["tcp"] = toml_edit::value(addr.to_string()),
            PersistedTarget::Kernel(index) => {
                table["kernel"] = toml_edit::value(true);
                if let Some(index) = index {
                    table["nbd_device"] = toml_edit::value(crate::kernel::device_path(*index));
                }
            }
        }
        Ok(())
    })
}

/// Removes the entry of `name` from the file at `path`; false if it had none.
pub fn remove_volume(path: &Path, name: &str) -> Result<bool, ConfigError> {
    let mut found = false;
    match read_text(path) {
        Err(ConfigError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    edit(path, |doc| {
        let tables = volume_tables(doc, path)?;
        let before = tables.len();
        tables.retain(|t| t.get("name").and_then(Item::as_str) != Some(name));
        found = tables.len() != before;
        Ok(())
    })?;
    Ok(found)
}

fn volume_tables<'a>(
    doc: &'a mut toml_edit::DocumentMut,
    path: &Path,
) -> Result<&'a mut toml_edit::ArrayOfTables, ConfigError> {
    let item = doc.entry(VOLUME_TABLE).or_insert(Item::ArrayOfTables(Default::default()));
    item.as_array_of_tables_mut().ok_or_else(|| ConfigError::File {
        path: path.to_path_buf(),
        message: format!("`{VOLUME_TABLE}` is not written as [[{VOLUME_TABLE}]] tables; edit it by hand"),
    })
}

/// Reads the file as it is now (the operator may have edited it since the
/// agent started), applies `change`, checks the result still loads, and
/// replaces the file atomically.
fn edit(
    path: &Path,
    change: impl FnOnce(&mut toml_edit::DocumentMut) -> Result<(), ConfigError>,
) -> Result<(), ConfigError> {
    let (text, mode) = match read_text(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
            (text, mode)
        }
        Err(ConfigError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => (String::new(), 0o644),
        Err(e) => return Err(e),
    };
    // Refuse to rewrite a file that does not load: the operator must see why.
    parse(path, &text)?;
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| ConfigError::At {
        path: path.to_path_buf(),
        line: line_of(&text, e.span()),
        message: e.message().trim().to_string(),
    })?;
    change(&mut doc)?;
    let new_text = doc.to_string();
    parse(path, &new_text)?;
    write_atomically(path, new_text.as_bytes(), mode)
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ConfigError> {
    let io = |what| move |error| ConfigError::Io { path: path.to_path_buf(), what, error };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io("cannot create the config file's directory"))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("cannot write the config file's temporary copy"))?;
    // The mode given to open is masked by the umask; the file's own mode is what counts.
    out.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io("cannot set the config file's mode"))?;
    out.write_all(bytes).map_err(io("cannot write the config file"))?;
    out.sync_all().map_err(io("cannot sync the config file"))?;
    drop(out);
    std::fs::rename(&tmp, path).map_err(io("cannot replace the config file"))?;
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io("cannot sync the config file's directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_command() -> clap::Command {
        clap::Command::new("run")
            .arg(clap::Arg::new("mds").long("mds").action(clap::ArgAction::Append))
            .arg(clap::Arg::new("io_threads").long("io-threads").value_parser(clap::value_parser!(u16).range(1..=256)))
            .arg(clap::Arg::new("config").long("config"))
    }

    #[test]
    fn settings_and_volumes_are_read_with_their_lines() {
        let text = "# comment\nmds = [\"a:1\", \"b:2\"]\nio_threads = 2\n\n[[volume]]\nname = \"db\"\nmode = \
                    \"shared\"\nsocket = \"/run/db.sock\"\n\n[[volume]]\nname = \"k\"\nnbd_device = \"/dev/nbd3\"\n";
        let c = parse(Path::new("/x.toml"), text).unwrap();
        assert_eq!(c.settings[0], Setting { key: "mds".into(), values: vec!["a:1".into(), "b:2".into()], line: 2 });
        assert_eq!(c.settings[1].values, vec!["2"]);
        for s in &c.settings {
            s.check(Path::new("/x.toml"), &run_command()).unwrap();
        }
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(c.volumes[0].mode, OpenMode::SharedWrite);
        assert_eq!(c.volumes[0].target, PersistedTarget::Socket(Some("/run/db.sock".into())));
        assert_eq!(c.volumes[1].target, PersistedTarget::Kernel(Some(3)));
        assert_eq!(c.volumes[1].line, 10);
    }

    #[test]
    fn bad_files_are_refused_naming_the_line_and_the_key() {
        let path = Path::new("/etc/a.toml");
        let e = parse(path, "mds = \"x\"\n[[volume]]\nname = \"v\"\nmod = \"ro\"\n").unwrap_err().to_string();
        assert!(e.starts_with("/etc/a.toml line 4: unknown key `mod`"), "{e}");
        let e = parse(path, "[[volume]]\nname = \"v\"\nmode = \"rw\"\n").unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("`mode`"), "{e}");
        let e = parse(path, "[[volume]]\nname = \"v\"\n[[volume]]\nname = \"v\"\n").unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("listed twice"), "{e}");
        let e = parse(path, "mds = \n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let c = parse(path, "\nio_thread = 2\n").unwrap();
        let e = c.settings[0].check(path, &run_command()).unwrap_err().to_string();
        assert!(e.starts_with("/etc/a.toml line 2: unknown key `io_thread`") && e.contains("io_threads"), "{e}");
        let c = parse(path, "io_threads = 0\n").unwrap();
        let e = c.settings[0].check(path, &run_command()).unwrap_err().to_string();
        assert!(e.contains("line 1: key `io_threads`") && e.contains("1..=256"), "{e}");
        let c = parse(path, "io_threads = [1, 2]\n").unwrap();
        assert!(c.settings[0].check(path, &run_command()).unwrap_err().to_string().contains("one value"));
    }

    #[test]
    fn a_missing_default_file_is_fine_a_missing_given_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        assert_eq!(load(&path, false).unwrap(), None);
        let e = load(&path, true).unwrap_err().to_string();
        assert!(e.contains("agent.toml") && e.contains("--config"), "{e}");
    }

    #[test]
    fn persisting_keeps_the_operators_comments_and_is_undone_by_removing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let original = "# the agent of host a\nmds = \"10.0.0.1:7700\"  # the server\n\n# by hand\n[[volume]]\nname \
                        = \"db\"\nmode = \"ro\"\n";
        std::fs::write(&path, original).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let kernel = PersistedVolume {
            name: "k".into(),
            mode: OpenMode::Exclusive,
            target: PersistedTarget::Kernel(Some(2)),
            line: 0,
        };
        add_volume(&path, &kernel).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(original), "{text}");
        assert!(text.contains("name = \"k\"") && text.contains("nbd_device = \"/dev/nbd2\""), "{text}");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // Replacing an entry keeps its place and comments.
        let db = PersistedVolume {
            name: "db".into(),
            mode: OpenMode::Exclusive,
            target: PersistedTarget::Socket(Some("/run/db.sock".into())),
            line: 0,
        };
        add_volume(&path, &db).unwrap();
        let c = load(&path, true).unwrap().unwrap();
        assert_eq!(c.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["db", "k"]);
        assert_eq!(c.volumes[0].target, db.target);
        assert!(std::fs::read_to_string(&path).unwrap().contains("# by hand\n[[volume]]\nname = \"db\""));
        assert!(remove_volume(&path, "k").unwrap());
        assert!(!remove_volume(&path, "k").unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# the agent of host a\nmds = \"10.0.0.1:7700\"  # the server\n"), "{text}");
        assert!(!text.contains("nbd"), "{text}");
        // A file that no longer loads is not rewritten.
        std::fs::write(&path, "mds = = 1\n").unwrap();
        assert!(matches!(add_volume(&path, &db), Err(ConfigError::At { line: 1, .. })));
        // A new file is created.
        let fresh = dir.path().join("sub/new.toml");
        add_volume(&fresh, &db).unwrap();
        assert_eq!(load(&fresh, true).unwrap().unwrap().volumes.len(), 1);
    }
}
