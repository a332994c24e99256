//! Man pages and shell completions from the clap definitions.
//!
//! Each binary exposes a hidden `generate` command (`sanvol-mds` a hidden
//! `--generate` flag, having no subcommands) that renders its own
//! `clap::Command` — the one that parses its arguments — so `--help` and
//! the man pages say the same thing by construction; a test compares them.
//! Packagers run it at build time (`scripts/install.sh` does).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// What `generate` writes.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Generate {
    /// Man pages (section 1) for the command and every subcommand, into DIR.
    Man {
        /// Where to write NAME.1, NAME-SUBCOMMAND.1, ...
        dir: PathBuf,
    },
    /// A completion script for SHELL, on stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Renders `what` for `cmd` (the binary's full command).
pub fn generate(mut cmd: clap::Command, what: &Generate) -> anyhow::Result<()> {
    match what {
        Generate::Man { dir } => {
            let pages = man_pages(cmd, dir)?;
            for page in pages {
                println!("{}", page.display());
            }
        }
        Generate::Completions { shell } => {
            let name = cmd.get_name().to_string();
            let mut out = std::io::stdout().lock();
            clap_complete::generate(*shell, &mut cmd, name, &mut out);
            out.flush()?;
        }
    }
    Ok(())
}

/// Writes one man page per visible command, `NAME.1` and
/// `NAME-SUB[-SUBSUB].1`, into `dir`; returns their paths.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = cmd;
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, dir, &mut written)?;
    Ok(written)
}

fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    // A built subcommand carries its full name ("sanvol-agent-run") and its
    // usage line names it as typed ("sanvol-agent run").
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name()).to_string();
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page).with_context(|| format!("rendering {name}.1"))?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}
